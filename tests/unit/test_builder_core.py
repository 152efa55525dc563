"""Unit tests of services.builder.core.Builder with a recording fake publish and a fake build (no broker)."""

from __future__ import annotations

import asyncio
from typing import Any

from events import (
    ArtifactReady,
    BuildFailed,
    BuildFinished,
    BuildStarted,
    CodeCommitted,
    CodeSource,
    FunctionSpec,
    PrewarmRequested,
)
from events.base import Record
from events.topics import Topics
from services.builder import handlers
from services.builder.build import BuildResult
from services.builder.core import Builder

TOPICS = Topics("ut.")
REPO = "file:///repos/app"
SHA = "ab" * 20
DIGEST = "sha256:" + "cd" * 32


def _spec(name: str, path: str = "fn", prewarm_on_commit: int = 2) -> FunctionSpec:
    return FunctionSpec(
        name=name,
        entrypoint="handler:main",
        source=CodeSource(kind="git", git_url=REPO, git_branch="main", git_path=path),
        prewarm_on_commit=prewarm_on_commit,
    )


def _push(changed: list[str] | None = None, source: Any = "generic") -> CodeCommitted:
    return CodeCommitted(
        repo=REPO, ref="refs/heads/main", after=SHA, changed_paths=changed, delivery_id="d1", source=source, pushed_ms=7
    )


class Table:
    def __init__(self, specs: list[FunctionSpec]) -> None:
        self.rows = {s.name: s for s in specs}
        self.waits = 0

    async def wait_caught_up(self, timeout_s: float) -> bool:
        self.waits += 1
        return True


class Harness:
    def __init__(self, specs: list[FunctionSpec], result: BuildResult) -> None:
        self.sent: list[tuple[Record, str, str]] = []
        self.builds: list[tuple[str, str | None, str]] = []
        self.result = result
        self.table = Table(specs)
        ids = iter(f"b{i}" for i in range(100))
        self.builder = Builder(TOPICS, self.publish, self.table, self.build, new_build_id=lambda: next(ids))

    async def publish(self, record: Record, topic: str, key: str) -> None:
        self.sent.append((record, topic, key))

    def build(self, spec: FunctionSpec, commit: str | None, build_id: str) -> BuildResult:
        self.builds.append((spec.name, commit, build_id))
        return self.result

    def push(self, event: CodeCommitted) -> None:
        asyncio.run(handlers.on_code_committed(self.builder, event))


OK = BuildResult(True, SHA, DIGEST, "file:///artifacts/x.zip", 123, log_uri="file:///logs/b0.log", duration_ms=5.0)


def test_a_push_that_touches_a_function_builds_it_and_publishes_its_artifact_and_prewarm() -> None:
    h = Harness([_spec("hello")], OK)
    h.push(_push(["fn/handler.py"]))
    assert h.table.waits == 1  # the specs are read once caught up: a function bound a moment ago is built
    assert h.builds == [("hello", SHA, "b0")]
    kinds = [(type(r), topic, key) for r, topic, key in h.sent]
    assert kinds == [
        (BuildStarted, TOPICS.build, "hello"),
        (ArtifactReady, TOPICS.artifact, "hello"),
        (PrewarmRequested, TOPICS.prewarm, "hello"),
        (BuildFinished, TOPICS.build, "hello"),
    ]
    artifact, prewarm, finished = h.sent[1][0], h.sent[2][0], h.sent[3][0]
    assert isinstance(artifact, ArtifactReady) and artifact.digest == DIGEST and artifact.pushed_ms == 7
    assert isinstance(prewarm, PrewarmRequested)
    assert prewarm.activate and prewarm.count == 2 and prewarm.digest == DIGEST and prewarm.build_id == "b0"
    assert isinstance(finished, BuildFinished) and finished.status == "ok"


def test_a_failing_build_publishes_its_failure_and_no_artifact_or_prewarm() -> None:
    failed = BuildResult(False, SHA, reason="requirements did not install: boom", log_uri="file:///logs/b0.log")
    h = Harness([_spec("hello")], failed)
    h.push(_push(["fn/requirements.txt"]))
    kinds = [type(r) for r, _topic, _key in h.sent]
    assert kinds == [BuildStarted, BuildFailed, BuildFinished]
    failure, finished = h.sent[1], h.sent[2][0]
    assert failure[1] == TOPICS.artifact
    assert isinstance(failure[0], BuildFailed) and failure[0].reason == "requirements did not install: boom"
    assert isinstance(finished, BuildFinished) and finished.status == "failed" and finished.digest is None


def test_a_failure_before_the_commit_is_known_names_the_pushed_commit() -> None:
    h = Harness([_spec("hello")], BuildResult(False, None, reason="git fetch failed"))
    h.push(_push())
    failure = h.sent[1][0]
    assert isinstance(failure, BuildFailed) and failure.commit == SHA


def test_a_push_that_touches_no_function_builds_nothing() -> None:
    h = Harness([_spec("hello", path="other")], OK)
    h.push(_push(["fn/handler.py"]))
    assert h.builds == [] and h.sent == []


def test_every_touched_function_is_built_in_name_order_each_with_its_own_build_id() -> None:
    h = Harness([_spec("zeta"), _spec("alpha")], OK)
    h.push(_push(["fn/handler.py"]))
    assert h.builds == [("alpha", SHA, "b0"), ("zeta", SHA, "b1")]
    assert [(type(r).__name__, key) for r, _t, key in h.sent if isinstance(r, BuildFinished)] == [
        ("BuildFinished", "alpha"),
        ("BuildFinished", "zeta"),
    ]


def test_a_push_from_the_cli_builds_the_branch_head() -> None:
    h = Harness([_spec("hello")], OK)
    h.push(_push(source="cli"))
    assert h.builds == [("hello", None, "b0")]
