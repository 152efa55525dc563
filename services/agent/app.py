"""Composition root of a node agent."""

from __future__ import annotations

import gc
from typing import Any

from events import ArtifactReady, BuildFailed
from events.base import Record
from services.agent import handlers
from services.agent.node import NodeAgent
from services.agent.settings import AgentSettings
from services.agent.work import ResultWriter
from services.common.admin import ensure_topics
from services.common.artifacts import LocalArtifactStore
from services.common.broker import make_broker
from services.common.runner import configure_logging, serve
from services.common.telemetry import setup_tracing
from services.common.views import Reader, dead_letters_to


async def run(settings: AgentSettings) -> None:
    configure_logging(settings.common)
    provider = setup_tracing(f"agent-{settings.node}", settings.common)
    broker = make_broker(settings.common, f"agent-{settings.node}", provider)

    async def publish(record: Record, topic: str, key: str | None) -> Any:
        return await broker.publish(record, topic, key=key.encode() if key else None)

    results = ResultWriter(settings.common.bootstrap, client_id=f"stoker-agent-{settings.node}-results")
    agent = NodeAgent(settings, publish, LocalArtifactStore(settings.common.artifacts_dir), results.write)
    work = handlers.work_consumer(broker, agent)

    def on_artifact(_function: str, record: Record | None) -> None:
        if isinstance(record, ArtifactReady):
            agent.sync_artifact(record.digest, record.uri)

    # Every node that runs functions reads every build outcome: code is in its cache before it is prewarmed.
    reader = Reader(
        settings.common.bootstrap,
        f"agent-{settings.node}",
        dead_letters=dead_letters_to(broker, settings.common.topics.dlq),
    )
    if settings.max_instances > 0:  # a node that runs no function (management) keeps no code
        reader.table(settings.common.topics.artifact, (ArtifactReady, BuildFailed), on_change=on_artifact)

    async def create_work_topic() -> None:
        await ensure_topics(settings.common.bootstrap, [settings.common.topics.work_spec(settings.node)])

    async def freeze_startup_objects() -> None:
        # What the process built to start lives as long as it does: out of the collector's reach,
        # a full collection under load walks only what invocations hold (it took ~150 ms before).
        gc.freeze()

    await serve(
        f"agent-{settings.node}",
        settings.common,
        broker,
        on_start=[create_work_topic, results.start, agent.start, reader.start, work.start, freeze_startup_objects],
        background=[work.run, agent.send_heartbeats, agent.maintain_pool, agent.send_metrics],
        # Commands stop first; in-flight invocations drain and their results go out; then the rest.
        on_stop=[work.stop, agent.shutdown, results.stop, reader.stop],
        ready_facts={"node": settings.node, "incarnation": agent.incarnation},
    )
    provider.shutdown()
