"""The pool family: requests to hold a function's code loaded ahead of demand, and their outcome."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from events.base import Record, now_ms


class PrewarmRequested(Record):
    """Load ``function`` at ``digest`` into at least ``count`` instances before requests come."""

    type: Literal["prewarm.requested"] = "prewarm.requested"
    function: str
    count: int = Field(default=1, ge=1, le=64)
    digest: str | None = None
    """The artifact to prewarm; ``None`` means the function's active version."""
    uri: str | None = None
    commit: str | None = None
    build_id: str | None = None
    pushed_ms: int = 0
    activate: bool = False
    """Switch the function's active version to this artifact once prewarmed (a new commit)."""
    reason: str = ""
    at_ms: int = Field(default_factory=now_ms)


class PrewarmCompleted(Record):
    """How a prewarm ended: ``ready`` (enough instances hold the code), ``timed_out`` or ``failed``."""

    type: Literal["prewarm.completed"] = "prewarm.completed"
    function: str
    digest: str | None = None
    commit: str | None = None
    status: Literal["ready", "timed_out", "failed", "superseded"]
    ready: int = 0
    wanted: int = 0
    activated: bool = False
    reason: str = ""
    duration_ms: float = 0.0
    at_ms: int = Field(default_factory=now_ms)


class RepoConfigured(Record):
    """Per-repository settings (compacted ``repo`` topic, key = repo URL): the webhook secret."""

    type: Literal["repo.configured"] = "repo.configured"
    repo: str
    webhook_secret: str
    at_ms: int = Field(default_factory=now_ms)
