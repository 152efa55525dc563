"""Pure routing: which node runs an invocation.

Preference, as the design says: a node with an idle ready instance of the function's version,
then one with an idle generic instance, then the least loaded eligible node. Eligibility
follows Kubernetes rules in their simplest form here: every NoSchedule/NoExecute taint of the
node must be tolerated (functions tolerate the runtime taint by default).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from events.instance import InstanceChanged
from events.node import InstanceSummary, NodeHeartbeat, Taint

RUNTIME_TAINT = Taint(key="stoker.io/dedicated", value="runtime", effect="NoSchedule")


@dataclass
class NodeView:
    """What the dispatcher believes about one node."""

    heartbeat: NodeHeartbeat
    last_seen_ms: int
    in_flight: dict[str, int] = field(default_factory=dict)
    """Invocations this dispatcher sent to the node and has no result for, per function."""
    recent: dict[str, InstanceChanged] = field(default_factory=dict)
    """Lifecycle events newer than the last heartbeat (a just-prewarmed instance, one just gone)."""
    _merged: list[InstanceSummary] | None = field(default=None, repr=False)

    def beat(self, heartbeat: NodeHeartbeat) -> None:
        """A new snapshot: events it already covers are dropped."""
        self.heartbeat, self.last_seen_ms = heartbeat, heartbeat.at_ms
        self.recent = {k: e for k, e in self.recent.items() if e.at_ms > heartbeat.at_ms}
        self._merged = None

    def saw(self, event: InstanceChanged) -> None:
        if event.incarnation == self.heartbeat.incarnation and event.at_ms > self.heartbeat.at_ms:
            self.recent[event.instance] = event
            self._merged = None

    @property
    def instances(self) -> list[InstanceSummary]:
        """The heartbeat's snapshot patched with the lifecycle events that came after it."""
        if self._merged is None:
            merged = {i.instance: i for i in self.heartbeat.instances}
            for event in self.recent.values():
                if event.state == "gone":
                    merged.pop(event.instance, None)
                else:
                    merged[event.instance] = InstanceSummary(
                        instance=event.instance,
                        state=event.state,
                        pid=event.pid,
                        function=event.function,
                        function_version=event.function_version,
                        uses=event.uses,
                    )
            self._merged = list(merged.values())
        return self._merged

    @property
    def name(self) -> str:
        return self.heartbeat.node

    @property
    def in_flight_total(self) -> int:
        return sum(self.in_flight.values())


def tolerated(taint: Taint, tolerations: Iterable[Taint]) -> bool:
    return taint.effect == "PreferNoSchedule" or any(
        t.key == taint.key and t.value == taint.value and t.effect == taint.effect for t in tolerations
    )


def eligible(node: NodeHeartbeat, tolerations: Iterable[Taint] = (RUNTIME_TAINT,)) -> bool:
    tols = list(tolerations)
    return all(tolerated(t, tols) for t in node.taints)


def _count(
    instances: Iterable[InstanceSummary], state: str, function: str | None = None, version: str | None = None
) -> int:
    return sum(
        1
        for i in instances
        if i.state == state and (function is None or (i.function == function and i.function_version == version))
    )


@dataclass(frozen=True)
class Choice:
    node: str
    reason: str


def choose_node(
    function: str,
    version: str,
    nodes: Mapping[str, NodeView],
    *,
    affinity: str | None = None,
) -> Choice | None:
    """Pick a node for one invocation of ``function@version``; None when no node is eligible.

    ``affinity`` is the node that last got this function: its instance may be warm already
    although no heartbeat has said so yet.
    """
    candidates = [v for v in nodes.values() if eligible(v.heartbeat)]
    if not candidates:
        return None

    def warm_idle(v: NodeView) -> int:
        ready = _count(v.instances, "ready", function, version)
        busy = _count(v.instances, "busy", function, version)
        return ready + busy - v.in_flight.get(function, 0)

    def generic_idle(v: NodeView) -> int:
        return _count(v.instances, "generic") - (v.in_flight_total - v.in_flight.get(function, 0))

    def load(v: NodeView) -> float:
        return (max(v.heartbeat.in_flight, v.in_flight_total) + 1) / max(1, v.heartbeat.capacity.max_instances)

    warm = [v for v in candidates if warm_idle(v) > 0]
    if warm:
        best = max(warm, key=lambda v: (warm_idle(v), v.name == affinity, -load(v)))
        return Choice(best.name, "warm")
    if affinity is not None and affinity in nodes and nodes[affinity] in candidates and load(nodes[affinity]) <= 1.0:
        return Choice(affinity, "affinity")
    generic = [v for v in candidates if generic_idle(v) > 0]
    if generic:
        best = max(generic, key=lambda v: (generic_idle(v), -load(v)))
        return Choice(best.name, "generic")
    best = min(candidates, key=lambda v: (load(v), v.name))
    return Choice(best.name, "least-loaded")
