"""The code family: commits arriving from git hosts, builds, and the artifacts they produce.

``code.committed`` (on ``code-commit``, key = repo) starts builds; ``artifact.ready`` and
``build.failed`` (on the compacted ``artifact`` topic, key = function) say how the latest build of
a function ended; ``build.started``/``build.finished`` (on ``build``, key = function) keep the
history that ``stoker fn builds`` lists.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from events.base import Record, now_ms

ZERO_SHA = "0" * 40


class CodeCommitted(Record):
    """A push (or a CLI request) that may change the code of functions bound to ``repo``."""

    type: Literal["code.committed"] = "code.committed"
    repo: str
    """The repository as the host names it: clone URL (``https://…``, ``ssh://…``, ``file://…``)."""
    repo_aliases: list[str] = Field(default_factory=list)
    """Other names of the same repository (SSH URL, web URL, ``owner/name``), for matching bindings."""
    ref: str
    """The pushed ref, e.g. ``refs/heads/main``."""
    before: str | None = None
    after: str | None = None
    """The pushed commit; ``None`` asks the builder to build the ref's current head."""
    changed_paths: list[str] | None = None
    """Files the push touched; ``None`` when the host does not say (every bound function rebuilds)."""
    delivery_id: str
    """The host's delivery id: the idempotency key of this event."""
    source: Literal["github", "gitlab", "generic", "cli"] = "generic"
    only_functions: list[str] | None = None
    """Restrict the builds to these functions (the CLI's first build of a new function)."""
    pushed_ms: int = Field(default_factory=now_ms)
    """When Stoker received the push; a later push of the same function wins."""

    @property
    def branch(self) -> str | None:
        return self.ref.removeprefix("refs/heads/") if self.ref.startswith("refs/heads/") else None

    @property
    def deleted(self) -> bool:
        return self.after == ZERO_SHA


class ArtifactReady(Record):
    """A function's code at ``commit`` is built and stored as a content-addressed artifact."""

    type: Literal["artifact.ready"] = "artifact.ready"
    function: str
    commit: str
    digest: str
    uri: str
    size: int
    build_id: str
    build_ms: float
    log_uri: str | None = None
    pushed_ms: int = 0
    built_ms: int = Field(default_factory=now_ms)


class BuildFailed(Record):
    """A build of ``function`` at ``commit`` failed; the function keeps serving its previous version."""

    type: Literal["build.failed"] = "build.failed"
    function: str
    commit: str | None = None
    build_id: str
    reason: str
    log_uri: str | None = None
    pushed_ms: int = 0
    at_ms: int = Field(default_factory=now_ms)


class BuildStarted(Record):
    type: Literal["build.started"] = "build.started"
    function: str
    build_id: str
    repo: str
    ref: str
    commit: str | None = None
    delivery_id: str = ""
    at_ms: int = Field(default_factory=now_ms)


class BuildFinished(Record):
    type: Literal["build.finished"] = "build.finished"
    function: str
    build_id: str
    status: Literal["ok", "failed"]
    commit: str | None = None
    digest: str | None = None
    reason: str = ""
    duration_ms: float = 0.0
    log_uri: str | None = None
    at_ms: int = Field(default_factory=now_ms)
