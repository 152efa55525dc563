"""``python -m services.cli.topics [--nodes N]``: create the topic catalogue on an existing Kafka."""

from __future__ import annotations

import argparse
import asyncio

from events import Topics, TopicSpec
from services.common.admin import ensure_topics
from services.common.settings import CommonSettings


def platform_topic_specs(topics: Topics, nodes: list[str]) -> list[TopicSpec]:
    """The shared catalogue plus one work topic per runtime node."""
    return topics.catalogue() + [topics.work_spec(node) for node in nodes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=2, help="runtime nodes runtime-0..N-1 to create work topics for")
    args = parser.parse_args()
    settings = CommonSettings.from_env()
    specs = platform_topic_specs(settings.topics, [f"runtime-{i}" for i in range(args.nodes)])
    created = asyncio.run(ensure_topics(settings.bootstrap, specs))
    print(f"created {len(created)} topics" + (f": {', '.join(created)}" if created else ""))


if __name__ == "__main__":
    main()
