"""The dispatchers' own state on Kafka: what each accepted invocation waits for, or runs on.

Records live on the compacted ``dispatch`` topic, key = invocation id, written to the partition
number of the invocation's own partition. The dispatcher that is assigned invocation partition
*p* rebuilds its queue and its in-flight ledger from partition *p* of ``dispatch`` (and, for work
sent too recently to have a record, from the Executes in the work topics); a tombstone means the
invocation ended (its terminal result is on ``result``). Nothing else reads them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from events.base import Record, now_ms
from events.invocation import InvocationRequested


class InvocationQueued(Record):
    """Accepted, and waiting for room (the function's concurrency, or an eligible node with capacity)."""

    type: Literal["dispatch.queued"] = "dispatch.queued"
    invocation: InvocationRequested
    source_offset: int
    """Its offset on the invocation partition: arrival order within the function's queue."""
    since_ms: int = Field(default_factory=now_ms)
    attempt: int = 1


class InvocationSent(Record):
    """Handed to a node and still running after a while (or sent from the queue, or a retry): its
    Execute command is on ``work.<node>`` for that agent incarnation."""

    type: Literal["dispatch.sent"] = "dispatch.sent"
    invocation: InvocationRequested
    source_offset: int
    node: str
    incarnation: str
    attempt: int = 1
    dispatched_ms: int = Field(default_factory=now_ms)


DispatchState = InvocationQueued | InvocationSent
