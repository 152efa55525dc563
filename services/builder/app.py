"""Composition root of the builder: code.committed -> builds -> artifacts -> prewarm."""

from __future__ import annotations

from typing import Any

from faststream.middlewares import AckPolicy

from events import CodeCommitted, FunctionSpec
from events.base import Record
from services.builder import handlers
from services.builder.build import BuildResult, run_build
from services.builder.core import Builder
from services.builder.settings import BuilderSettings
from services.common.artifacts import LocalArtifactStore
from services.common.broker import make_broker
from services.common.runner import configure_logging, serve
from services.common.telemetry import setup_tracing
from services.common.views import FETCH_ROUTINE_TIMER_MS, Reader, dead_letters_to


async def run(settings: BuilderSettings) -> None:
    common = settings.common
    topics = common.topics
    configure_logging(common)
    provider = setup_tracing("builder", common)
    broker = make_broker(common, "builder", provider)
    store = LocalArtifactStore(common.artifacts_dir)
    reader = Reader(common.bootstrap, "builder", dead_letters=dead_letters_to(broker, topics.dlq))
    functions = reader.table(topics.function, (FunctionSpec,))

    async def publish(record: Record, topic: str, key: str) -> Any:
        return await broker.publish(record, topic, key=key.encode())

    def build(spec: FunctionSpec, commit: str | None, build_id: str) -> BuildResult:
        return run_build(spec, commit, settings, store, build_id)

    builder = Builder(topics, publish, functions, build)

    # Committed after every build of the push has published its outcome: a builder that dies
    # mid-build builds the push again after restart.
    @broker.subscriber(
        topics.code_commit,
        group_id="stoker-builder",
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.NACK_ON_ERROR,
        max_poll_interval_ms=30 * 60 * 1000,
        consumer_timeout_ms=FETCH_ROUTINE_TIMER_MS,
    )
    async def on_code_committed(event: CodeCommitted) -> None:
        await handlers.on_code_committed(builder, event)

    await serve("builder", common, broker, on_start=[reader.start], on_stop=[reader.stop])
    provider.shutdown()
