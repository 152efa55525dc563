"""The node family: registration and heartbeat on the compacted ``node`` topic (key = node)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from events.base import Record, now_ms
from events.instance import InstanceState


class NodeCapacity(BaseModel):
    """What one node offers."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    max_instances: int = 8
    cpu_millis: int = 2000
    memory_mb: int = 4096


class Taint(BaseModel):
    """A Kubernetes-style taint: ``key=value:effect``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    key: str
    value: str = ""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = "NoSchedule"


class InstanceSummary(BaseModel):
    """One instance as its node last saw it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    instance: str
    state: InstanceState
    pid: int | None = None
    function: str | None = None
    function_version: str | None = None
    uses: int = 0
    idle_ms: int = 0


class NodeHeartbeat(Record):
    """A node is alive: who it is, what it offers, and what it runs right now.

    The first heartbeat of an ``incarnation`` is its registration; the snapshot of instances
    lets every reader rebuild its view of the node without replaying instance events.
    """

    type: Literal["node.heartbeat"] = "node.heartbeat"
    node: str
    incarnation: str
    labels: dict[str, str] = Field(default_factory=dict)
    taints: list[Taint] = Field(default_factory=list)
    capacity: NodeCapacity = Field(default_factory=NodeCapacity)
    pool_target: int = 0
    instances: list[InstanceSummary] = Field(default_factory=list)
    in_flight: int = 0
    unschedulable: bool = False
    """Cordoned: takes no new instances or invocations (``stoker node cordon``/``drain``)."""
    seq: int = 0
    interval_ms: int = 500
    at_ms: int = Field(default_factory=now_ms)

    def fresh(self, at_ms: int, timeout_ms: int | None = None) -> bool:
        """Whether the node counts as up at ``at_ms`` (:func:`node_up`, from this heartbeat)."""
        return node_up(self.at_ms, at_ms, self.interval_ms, timeout_ms)


MIN_HEARTBEAT_INTERVAL_MS = 500
"""A node that claims to beat faster is still given three of these before it counts as down."""


def node_up(heard_ms: int, at_ms: int, interval_ms: int, timeout_ms: int | None = None) -> bool:
    """The one rule for "a node is up": last heard of (``heard_ms``) no longer than the timeout ago.

    The timeout is ``timeout_ms`` where a service is configured with one (the dispatcher's
    ``STOKER_NODE_TIMEOUT_S``); else three of the node's heartbeat intervals, which is the same
    6 s for the agents' default interval of 2 s.
    """
    if timeout_ms is None:
        timeout_ms = 3 * max(interval_ms, MIN_HEARTBEAT_INTERVAL_MS)
    return at_ms - heard_ms <= timeout_ms


class NodeStopped(Record):
    """A node's agent shut down cleanly: its work is done and it takes no more."""

    type: Literal["node.stopped"] = "node.stopped"
    node: str
    incarnation: str
    at_ms: int = Field(default_factory=now_ms)
