"""The pool family: requests to hold a function's code loaded ahead of demand, and their outcome."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from events.base import Record, now_ms
from events.function import FunctionSpec


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
    keepalive_window_ms: int | None = None
    """A keep-alive prewarm's window (the end of the invocation it follows): one request per window."""
    at_ms: int = Field(default_factory=now_ms)


class PrewarmStarted(Record):
    """The pool manager sent the Specialize commands of a prewarm request and now waits for them.

    Written with those commands (and the request's offset) in one transaction, on the prewarm
    topic after the request: a pool manager that takes over finds it there and waits for the same
    instances instead of sending the commands again.
    """

    type: Literal["prewarm.started"] = "prewarm.started"
    function: str
    request: PrewarmRequested
    target: FunctionSpec
    """The spec being loaded (the current one with the request's artifact)."""
    wanted: int = 1
    holders: list[str] = Field(default_factory=list)
    """Instances that already held the version when the prewarm started."""
    specialize: dict[str, int] = Field(default_factory=dict)
    """Instances asked for, per node."""
    source_partition: int = 0
    source_offset: int = 0
    """Where the request is on the prewarm topic (what this prewarm is for)."""
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
