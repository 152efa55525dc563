"""The invocation family: the public contract any Kafka client may use.

``invocation.requested`` goes to the ``invocation`` topic keyed by function name;
exactly one ``invocation.completed`` per accepted invocation comes back on ``result``.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from events.base import Record, now_ms

Status = Literal["ok", "error", "timeout", "rejected", "lost"]
StartKind = Literal["warm", "prewarmed", "pool", "zygote", "spawn"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"ok", "error", "timeout", "rejected", "lost"})


def new_invocation_id() -> str:
    """A fresh, unique invocation id."""
    return uuid.uuid4().hex


class InvocationRequested(Record):
    """A request to run a function once."""

    type: Literal["invocation.requested"] = "invocation.requested"
    id: str = Field(default_factory=new_invocation_id, min_length=1, max_length=200)
    """Unique per invocation; the idempotency key (a repeated id is not run twice)."""
    function: str = Field(min_length=1, max_length=200)
    payload: Any = None
    """Any JSON value: the function's ``event`` argument."""
    reply_to: str | None = None
    """A topic that also receives the result (besides ``result``)."""
    deadline_ms: int | None = None
    """Epoch ms after which the request is not worth running: not yet started, it ends as
    ``timeout``; still waiting for capacity, ``rejected``; on a node that died, ``lost``."""
    requested_ms: int = Field(default_factory=now_ms)
    principal: str | None = None
    """Who asked, as the gateway verified it (the token id); ``None`` from a Kafka client or a public call."""

    def expired(self, at_ms: int) -> bool:
        """Whether the deadline has passed at ``at_ms``."""
        return self.deadline_ms is not None and at_ms >= self.deadline_ms


class ErrorInfo(BaseModel):
    """Why an invocation did not end ``ok``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    kind: str
    """Exception type for function errors, or a platform reason (``unknown_function``, ...)."""
    message: str = ""
    traceback: str | None = None


class Timings(BaseModel):
    """Where the time of one invocation went, in milliseconds."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    queue: float = 0.0
    """From the request's timestamp until an instance was chosen on a node."""
    start: float = 0.0
    """Getting an instance ready for the function (0 for a warm start)."""
    exec: float = 0.0
    """Running the function inside the instance."""
    total: float = 0.0
    """From the request's timestamp until the result was written."""


class InvocationCompleted(Record):
    """The single terminal result of an accepted invocation."""

    type: Literal["invocation.completed"] = "invocation.completed"
    id: str
    function: str
    status: Status
    output: Any = None
    error: ErrorInfo | None = None
    start: StartKind | None = None
    timings_ms: Timings = Field(default_factory=Timings)
    node: str | None = None
    instance: str | None = None
    function_version: str | None = None
    attempt: int = 1
    logs: str | None = None
    """The tail of what the function printed during this invocation, size-capped."""
    principal: str | None = None
    """Who asked for it (the invocation's ``principal``)."""
    completed_ms: int = Field(default_factory=now_ms)
