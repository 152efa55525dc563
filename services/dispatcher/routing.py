"""Pure routing: which node runs an invocation.

Preference, as the design says: a node with an idle ready instance of the function's version,
then one with an idle generic instance, then the least loaded eligible node. Eligibility follows
the Kubernetes rules of :mod:`services.common.placement` (node selector, taints, tolerations).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from events.instance import InstanceChanged
from events.node import InstanceSummary, NodeHeartbeat
from events.placement import ROLE, RUNTIME_TOLERATION, Toleration
from services.common import placement


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
    _counts: dict[tuple[str, str | None, str | None], int] | None = field(default=None, repr=False)
    """Instances by (state, function, version), by (state, None, None) and by ("", function, None)."""
    _placeable: dict[tuple[object, ...], tuple[bool, bool]] = field(default_factory=dict, repr=False)
    """(selector, tolerations) -> (eligible, prefers not): a heartbeat's labels and taints hold till the next."""

    def beat(self, heartbeat: NodeHeartbeat) -> None:
        """A new snapshot: events it already covers are dropped."""
        self.heartbeat, self.last_seen_ms = heartbeat, heartbeat.at_ms
        self.recent = {k: e for k, e in self.recent.items() if e.at_ms > heartbeat.at_ms}
        self._merged = self._counts = None
        self._placeable = {}

    def saw(self, event: InstanceChanged) -> None:
        if event.incarnation == self.heartbeat.incarnation and event.at_ms > self.heartbeat.at_ms:
            self.recent[event.instance] = event
            self._merged = self._counts = None

    def count(self, state: str, function: str | None = None, version: str | None = None) -> int:
        """Instances in ``state`` (of ``function@version`` if given); ``state=""``: of ``function``, any state."""
        if self._counts is None:
            counts: dict[tuple[str, str | None, str | None], int] = {}
            for i in self.instances:
                # A generic instance has no function: its two state keys are one (counted once).
                for key in {(i.state, None, None), (i.state, i.function, i.function_version), ("", i.function, None)}:
                    counts[key] = counts.get(key, 0) + 1
            self._counts = counts
        return self._counts.get((state, function, version), 0)

    def placeable(self, selector: Mapping[str, str], tolerations: tuple[Toleration, ...]) -> tuple[bool, bool]:
        """(eligible, has a PreferNoSchedule taint not tolerated) for a function with these rules."""
        key = (tuple(sorted(selector.items())), tolerations)
        found = self._placeable.get(key)
        if found is None:
            found = self._placeable[key] = (
                placement.eligible(self.heartbeat, selector, tolerations),
                placement.prefers_not(self.heartbeat, tolerations),
            )
        return found

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


@dataclass(frozen=True)
class Choice:
    node: str
    reason: str


def choose_node(
    function: str,
    version: str,
    nodes: Mapping[str, NodeView],
    *,
    selector: Mapping[str, str] | None = None,
    tolerations: Iterable[Toleration] = (RUNTIME_TOLERATION,),
    affinity: str | None = None,
) -> Choice | None:
    """Pick a node for one invocation of ``function@version``; None when no node is eligible.

    Eligibility is the Kubernetes rule set of :mod:`services.common.placement`. Among eligible
    nodes: an idle instance of this version first; then a node with an idle generic instance,
    spreading the function over nodes (fewest of its instances first); then the least loaded.
    ``affinity`` (the node that last got this version) breaks ties: its instance may be warm by now.
    """
    tols = tuple(tolerations)
    wanted = {ROLE: "runtime"} if selector is None else selector
    rules = {v.name: v.placeable(wanted, tols) for v in nodes.values()}
    candidates = [v for v in nodes.values() if rules[v.name][0]]
    if not candidates:
        return None

    def warm_idle(v: NodeView) -> int:
        return v.count("ready", function, version) + v.count("busy", function, version) - v.in_flight.get(function, 0)

    def generic_idle(v: NodeView) -> int:
        return v.count("generic") - (v.in_flight_total - v.in_flight.get(function, 0))

    def load(v: NodeView) -> float:
        return (max(v.heartbeat.in_flight, v.in_flight_total) + 1) / max(1, v.heartbeat.capacity.max_instances)

    def spread(v: NodeView) -> int:
        return v.count("", function) + v.in_flight.get(function, 0)

    def avoided(v: NodeView) -> bool:
        return rules[v.name][1]

    warm = [v for v in candidates if warm_idle(v) > 0]
    if warm:
        best = max(warm, key=lambda v: (not avoided(v), warm_idle(v), v.name == affinity, -load(v)))
        return Choice(best.name, "warm")
    generic = [v for v in candidates if generic_idle(v) > 0]
    if generic:
        best = min(generic, key=lambda v: (avoided(v), v.name != affinity, spread(v), -generic_idle(v), load(v)))
        return Choice(best.name, "generic")
    best = min(candidates, key=lambda v: (avoided(v), load(v) > 1.0, load(v), spread(v), v.name))
    return Choice(best.name, "least-loaded")
