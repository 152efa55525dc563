"""Composition root and handler of the builder: code.committed -> builds -> artifacts -> prewarm."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from faststream.middlewares import AckPolicy
from opentelemetry import trace

from events import (
    ArtifactReady,
    BuildFailed,
    BuildFinished,
    BuildStarted,
    CodeCommitted,
    FunctionSpec,
    PrewarmRequested,
)
from events.base import Record
from services.builder.build import run_build
from services.builder.matching import functions_to_build
from services.builder.settings import BuilderSettings
from services.common import telemetry
from services.common.artifacts import LocalArtifactStore
from services.common.broker import make_broker
from services.common.runner import configure_logging, serve
from services.common.telemetry import setup_tracing
from services.common.views import FETCH_ROUTINE_TIMER_MS, Reader, dead_letters_to

log = logging.getLogger("stoker.builder")
tracer = trace.get_tracer("stoker.builder")


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

    async def build_one(spec: FunctionSpec, event: CodeCommitted) -> None:
        build_id = uuid.uuid4().hex[:12]
        attributes = {telemetry.FUNCTION: spec.name, "stoker.build.id": build_id, "stoker.commit": event.after or ""}
        with tracer.start_as_current_span("stoker build", attributes=attributes) as span:
            await publish(
                BuildStarted(
                    function=spec.name,
                    build_id=build_id,
                    repo=event.repo,
                    ref=event.ref,
                    commit=event.after,
                    delivery_id=event.delivery_id,
                ),
                topics.build,
                spec.name,
            )
            commit = None if event.source == "cli" else event.after
            result = await asyncio.to_thread(run_build, spec, commit, settings, store, build_id)
            span.set_attribute("stoker.build.status", "ok" if result.ok else "failed")
            if result.ok and result.digest and result.uri and result.commit:
                await publish(
                    ArtifactReady(
                        function=spec.name,
                        commit=result.commit,
                        digest=result.digest,
                        uri=result.uri,
                        size=result.size,
                        build_id=build_id,
                        build_ms=result.duration_ms,
                        log_uri=result.log_uri,
                        pushed_ms=event.pushed_ms,
                    ),
                    topics.artifact,
                    spec.name,
                )
                await publish(
                    PrewarmRequested(
                        function=spec.name,
                        count=max(1, spec.prewarm_on_commit),
                        digest=result.digest,
                        uri=result.uri,
                        commit=result.commit,
                        build_id=build_id,
                        pushed_ms=event.pushed_ms,
                        activate=True,
                        reason=f"commit {result.commit[:12]}",
                    ),
                    topics.prewarm,
                    spec.name,
                )
            else:
                await publish(
                    BuildFailed(
                        function=spec.name,
                        commit=result.commit or event.after,
                        build_id=build_id,
                        reason=result.reason,
                        log_uri=result.log_uri,
                        pushed_ms=event.pushed_ms,
                    ),
                    topics.artifact,
                    spec.name,
                )
            await publish(
                BuildFinished(
                    function=spec.name,
                    build_id=build_id,
                    status="ok" if result.ok else "failed",
                    commit=result.commit,
                    digest=result.digest,
                    reason=result.reason,
                    duration_ms=result.duration_ms,
                    log_uri=result.log_uri,
                ),
                topics.build,
                spec.name,
            )
            log.info("build %s of %s: %s %s", build_id, spec.name, "ok" if result.ok else "failed", result.reason)

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
        await functions.wait_caught_up(timeout_s=2.0)
        targets = functions_to_build(event, functions.rows.values())
        if not targets:
            log.info("push %s to %s %s: no function bound there", event.delivery_id, event.repo, event.ref)
        for spec in targets:
            await build_one(spec, event)

    await serve("builder", common, broker, on_start=[reader.start], on_stop=[reader.stop])
    provider.shutdown()
