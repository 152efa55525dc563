"""Commands addressed to one node's agent, on its ``work.<node>`` topic.

Commands carry everything the agent needs (the function spec travels with Execute), so an
agent keeps no function registry of its own and runs exactly the version it was sent.
Each command names the agent ``incarnation`` it was meant for: a restarted agent ignores
its predecessor's commands, and the dispatcher re-routes what the dead incarnation held.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from events.base import Record, now_ms
from events.function import FunctionSpec
from events.invocation import InvocationRequested
from events.node import Taint

SOURCE_HEADER = "stoker-source"
"""Header of every Execute: ``<partition>:<offset>`` of the invocation record it hands on. A
dispatcher taking over a partition finds the work its predecessor sent but did not record on
``dispatch`` by this header, without decoding the commands."""


def source_header(partition: int, offset: int) -> bytes:
    return f"{partition}:{offset}".encode()


def parse_source_header(value: bytes) -> tuple[int, int] | None:
    """``(partition, offset)`` of a ``stoker-source`` header, or None if it is not one."""
    partition, sep, offset = value.partition(b":")
    if not sep or not partition.isdigit() or not offset.isdigit():
        return None
    return int(partition), int(offset)


class Execute(Record):
    """Run one invocation on this node."""

    type: Literal["work.execute"] = "work.execute"
    invocation: InvocationRequested
    spec: FunctionSpec
    incarnation: str
    attempt: int = 1
    dispatched_ms: int = Field(default_factory=now_ms)


class Specialize(Record):
    """Load a function's code into ``count`` instances ahead of demand."""

    type: Literal["work.specialize"] = "work.specialize"
    spec: FunctionSpec
    incarnation: str
    count: int = 1


class EnsurePool(Record):
    """Keep ``generic`` unspecialized instances ready on this node."""

    type: Literal["work.ensure-pool"] = "work.ensure-pool"
    incarnation: str
    generic: int = Field(ge=0)


class Recycle(Record):
    """Stop idle instances: one by id, or every instance of a function."""

    type: Literal["work.recycle"] = "work.recycle"
    incarnation: str
    instance: str | None = None
    function: str | None = None
    reason: str = ""
    busy_too: bool = False
    """Also retire instances that are busy now, once their invocation ends (draining a function)."""
    force: bool = False
    """Kill at once, busy or not (an instance over its memory bound); its invocation ends ``error``."""


class Clamp(Record):
    """Set (or, with ``cpu_millis`` None, restore) the CPU quota of one instance or of a function's instances."""

    type: Literal["work.clamp"] = "work.clamp"
    incarnation: str
    instance: str | None = None
    function: str | None = None
    cpu_millis: int | None = None
    reason: str = ""


class ConfigureNode(Record):
    """Change a running node: labels, taints, cordon, drain (``stoker node …``)."""

    type: Literal["work.configure-node"] = "work.configure-node"
    incarnation: str
    labels: dict[str, str | None] = Field(default_factory=dict)
    """Labels to set; a ``None`` value removes the label."""
    add_taints: list[Taint] = Field(default_factory=list)
    remove_taints: list[str] = Field(default_factory=list)
    """Keys of taints to remove."""
    unschedulable: bool | None = None
    drain: bool = False
    """Cordon, and recycle every instance (busy ones once their invocation ends)."""


WorkCommand = Execute | Specialize | EnsurePool | Recycle | Clamp | ConfigureNode
