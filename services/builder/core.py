"""The builder's decisions around one push: which functions it rebuilds and what each build publishes.

A build that succeeds publishes its artifact and a prewarm request that activates it; one that
fails publishes ``build.failed``; both end with ``build.finished``. The builder never writes the
function's spec: the pool manager activates the new artifact when its prewarm is done.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

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
from events.topics import Topics
from services.builder.build import BuildResult
from services.builder.matching import functions_to_build
from services.common import telemetry

log = logging.getLogger("stoker.builder")
tracer = trace.get_tracer("stoker.builder")

Publish = Callable[[Record, str, str], Awaitable[Any]]
"""Write one record (record, topic, key) and wait for the broker's confirmation."""

RunBuild = Callable[[FunctionSpec, str | None, str], BuildResult]
"""Build a spec at a commit (None: its branch head) under a build id; blocking, run in a thread."""


class Functions(Protocol):
    """What the builder reads of the function specs (a :class:`services.common.views.Table`)."""

    @property
    def rows(self) -> Mapping[str, FunctionSpec]: ...

    async def wait_caught_up(self, timeout_s: float) -> bool: ...


class Builder:
    """Turns pushes into builds and builds into artifact, prewarm and build events."""

    def __init__(
        self,
        topics: Topics,
        publish: Publish,
        functions: Functions,
        run_build: RunBuild,
        new_build_id: Callable[[], str] = lambda: uuid.uuid4().hex[:12],
    ) -> None:
        self.topics = topics
        self._publish = publish
        self._functions = functions
        self._run_build = run_build
        self._new_build_id = new_build_id

    async def on_code_committed(self, event: CodeCommitted) -> None:
        """Build every function the push touches, one after the other."""
        await self._functions.wait_caught_up(timeout_s=2.0)
        targets = functions_to_build(event, self._functions.rows.values())
        if not targets:
            log.info("push %s to %s %s: no function bound there", event.delivery_id, event.repo, event.ref)
        for spec in targets:
            await self.build_one(spec, event)

    async def build_one(self, spec: FunctionSpec, event: CodeCommitted) -> None:
        """Build ``spec`` for the push ``event`` and publish how it went."""
        topics = self.topics
        build_id = self._new_build_id()
        attributes = {telemetry.FUNCTION: spec.name, "stoker.build.id": build_id, "stoker.commit": event.after or ""}
        with tracer.start_as_current_span("stoker build", attributes=attributes) as span:
            await self._publish(
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
            result = await asyncio.to_thread(self._run_build, spec, commit, build_id)
            span.set_attribute("stoker.build.status", "ok" if result.ok else "failed")
            for record, topic in outcome(spec, event, build_id, result, topics):
                await self._publish(record, topic, spec.name)
            log.info("build %s of %s: %s %s", build_id, spec.name, "ok" if result.ok else "failed", result.reason)


def outcome(
    spec: FunctionSpec, event: CodeCommitted, build_id: str, result: BuildResult, topics: Topics
) -> list[tuple[Record, str]]:
    """The records a finished build publishes, in order, with their topics."""
    records: list[tuple[Record, str]] = []
    if result.ok and result.digest and result.uri and result.commit:
        records.append(
            (
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
            )
        )
        records.append(
            (
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
            )
        )
    else:
        records.append(
            (
                BuildFailed(
                    function=spec.name,
                    commit=result.commit or event.after,
                    build_id=build_id,
                    reason=result.reason,
                    log_uri=result.log_uri,
                    pushed_ms=event.pushed_ms,
                ),
                topics.artifact,
            )
        )
    records.append(
        (
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
        )
    )
    return records
