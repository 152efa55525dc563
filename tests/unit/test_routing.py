"""Unit tests of services.dispatcher.routing: eligibility and node choice."""

from __future__ import annotations

import pytest

from events import InstanceSummary, NodeCapacity, NodeHeartbeat, Taint
from services.dispatcher.routing import RUNTIME_TAINT, Choice, NodeView, choose_node, eligible, tolerated

FN, VER = "hello", "v1"


def _ready(i: str, fn: str = FN, ver: str = VER, state: str = "ready") -> InstanceSummary:
    return InstanceSummary(instance=i, state=state, function=fn, function_version=ver)  # type: ignore[arg-type]


def _generic(i: str) -> InstanceSummary:
    return InstanceSummary(instance=i, state="generic")


def _view(
    name: str, instances=(), *, taints=(), in_flight=None, hb_in_flight: int = 0, max_instances: int = 8
) -> NodeView:
    hb = NodeHeartbeat(
        node=name,
        incarnation=f"{name}-1",
        instances=list(instances),
        taints=list(taints),
        in_flight=hb_in_flight,
        capacity=NodeCapacity(max_instances=max_instances),
        at_ms=1,
    )
    return NodeView(hb, last_seen_ms=1, in_flight=dict(in_flight or {}))


def _nodes(*views: NodeView) -> dict[str, NodeView]:
    return {v.name: v for v in views}


def test_no_nodes_is_none() -> None:
    assert choose_node(FN, VER, {}) is None


def test_warm_preferred_over_generic_and_least_loaded() -> None:
    nodes = _nodes(
        _view("a"),  # empty: least loaded
        _view("b", [_generic("g1"), _generic("g2")]),
        _view("c", [_ready("r1")], hb_in_flight=3),
    )
    assert choose_node(FN, VER, nodes) == Choice("c", "warm")


def test_generic_preferred_over_least_loaded() -> None:
    nodes = _nodes(_view("a"), _view("b", [_generic("g1")], hb_in_flight=2))
    assert choose_node(FN, VER, nodes) == Choice("b", "generic")


def test_least_loaded_when_nothing_is_idle() -> None:
    nodes = _nodes(_view("a", hb_in_flight=3), _view("b", hb_in_flight=1), _view("c", hb_in_flight=2))
    assert choose_node(FN, VER, nodes) == Choice("b", "least-loaded")


def test_least_loaded_is_relative_to_capacity() -> None:
    nodes = _nodes(_view("a", hb_in_flight=2, max_instances=4), _view("b", hb_in_flight=3, max_instances=16))
    assert choose_node(FN, VER, nodes) == Choice("b", "least-loaded")


def test_least_loaded_tie_breaks_by_name() -> None:
    nodes = _nodes(_view("b"), _view("a"), _view("c"))
    assert choose_node(FN, VER, nodes) == Choice("a", "least-loaded")


def test_least_loaded_counts_dispatcher_in_flight() -> None:
    # The heartbeat of "a" lags: it says 0 in flight, but this dispatcher sent it 3.
    nodes = _nodes(_view("a", in_flight={"other": 3}), _view("b", hb_in_flight=1))
    assert choose_node(FN, VER, nodes) == Choice("b", "least-loaded")


def test_warm_needs_same_version() -> None:
    nodes = _nodes(_view("a", [_ready("r1", ver="old")]), _view("b", [_generic("g")]))
    assert choose_node(FN, VER, nodes) == Choice("b", "generic")


def test_warm_needs_same_function() -> None:
    nodes = _nodes(_view("a", [_ready("r1", fn="other")]), _view("b"))
    assert choose_node(FN, VER, nodes).reason == "least-loaded"  # type: ignore[union-attr]


def test_dispatcher_in_flight_reduces_warm_idle() -> None:
    # "a" has one ready instance but this dispatcher already sent it one invocation of FN.
    nodes = _nodes(_view("a", [_ready("r1")], in_flight={FN: 1}), _view("b", [_ready("r2")]))
    assert choose_node(FN, VER, nodes) == Choice("b", "warm")


def test_warm_all_taken_falls_back_to_generic() -> None:
    nodes = _nodes(_view("a", [_ready("r1")], in_flight={FN: 1}), _view("b", [_generic("g")]))
    assert choose_node(FN, VER, nodes) == Choice("b", "generic")


def test_dispatcher_in_flight_of_other_functions_reduces_generic_idle() -> None:
    nodes = _nodes(_view("a", [_generic("g1")], in_flight={"other": 1}), _view("b", [_generic("g2")]))
    assert choose_node(FN, VER, nodes) == Choice("b", "generic")


def test_most_warm_instances_wins() -> None:
    nodes = _nodes(_view("a", [_ready("r1")]), _view("b", [_ready("r2"), _ready("r3")]))
    assert choose_node(FN, VER, nodes) == Choice("b", "warm")


def test_most_generic_instances_wins() -> None:
    nodes = _nodes(_view("a", [_generic("g1")]), _view("b", [_generic("g2"), _generic("g3")]))
    assert choose_node(FN, VER, nodes) == Choice("b", "generic")


def test_affinity_breaks_warm_ties() -> None:
    nodes = _nodes(_view("a", [_ready("r1")]), _view("b", [_ready("r2")]))
    assert choose_node(FN, VER, nodes, affinity="b") == Choice("b", "warm")
    assert choose_node(FN, VER, nodes, affinity="a") == Choice("a", "warm")


def test_affinity_used_before_generic_when_nothing_warm() -> None:
    nodes = _nodes(_view("a"), _view("b", [_generic("g")]))
    assert choose_node(FN, VER, nodes, affinity="a") == Choice("a", "affinity")


def test_affinity_does_not_beat_warm_elsewhere() -> None:
    nodes = _nodes(_view("a"), _view("b", [_ready("r")]))
    assert choose_node(FN, VER, nodes, affinity="a") == Choice("b", "warm")


def test_affinity_ignored_when_node_is_full() -> None:
    nodes = _nodes(_view("a", hb_in_flight=4, max_instances=4), _view("b", [_generic("g")]))
    assert choose_node(FN, VER, nodes, affinity="a") == Choice("b", "generic")


def test_affinity_ignored_when_unknown_or_ineligible() -> None:
    iso = Taint(key="stoker.io/dedicated", value="isolated", effect="NoSchedule")
    nodes = _nodes(_view("a", taints=[iso]), _view("b"))
    assert choose_node(FN, VER, nodes, affinity="a") == Choice("b", "least-loaded")
    assert choose_node(FN, VER, nodes, affinity="gone") == Choice("b", "least-loaded")


def test_untolerated_noschedule_taint_never_chosen() -> None:
    iso = Taint(key="stoker.io/dedicated", value="isolated", effect="NoSchedule")
    # The tainted node is the best on every count: warm, generic and idle.
    nodes = _nodes(_view("a", [_ready("r1"), _ready("r2"), _generic("g")], taints=[iso]), _view("b", hb_in_flight=7))
    assert choose_node(FN, VER, nodes) == Choice("b", "least-loaded")
    assert choose_node(FN, VER, nodes, affinity="a") == Choice("b", "least-loaded")


def test_only_tainted_nodes_gives_none() -> None:
    iso = Taint(key="stoker.io/dedicated", value="isolated", effect="NoSchedule")
    gpu = Taint(key="gpu", effect="NoExecute")
    nodes = _nodes(_view("a", [_ready("r")], taints=[iso]), _view("b", taints=[gpu]))
    assert choose_node(FN, VER, nodes) is None


def test_runtime_taint_tolerated_by_default() -> None:
    nodes = _nodes(_view("a", [_ready("r")], taints=[RUNTIME_TAINT]))
    assert choose_node(FN, VER, nodes) == Choice("a", "warm")
    assert RUNTIME_TAINT == Taint(key="stoker.io/dedicated", value="runtime", effect="NoSchedule")


def test_prefer_noschedule_does_not_exclude() -> None:
    soft = Taint(key="maintenance", value="soon", effect="PreferNoSchedule")
    nodes = _nodes(_view("a", [_ready("r")], taints=[soft]))
    assert choose_node(FN, VER, nodes) == Choice("a", "warm")


def test_runtime_taint_with_other_effect_is_not_tolerated() -> None:
    execute = Taint(key="stoker.io/dedicated", value="runtime", effect="NoExecute")
    assert not eligible(_view("a", taints=[execute]).heartbeat)


@pytest.mark.parametrize(
    "taints,ok",
    [
        ([], True),
        ([RUNTIME_TAINT], True),
        ([Taint(key="x", effect="PreferNoSchedule")], True),
        ([RUNTIME_TAINT, Taint(key="x", value="y", effect="NoSchedule")], False),
        ([Taint(key="stoker.io/dedicated", value="isolated", effect="NoSchedule")], False),
        ([Taint(key="stoker.io/dedicated", value="", effect="NoSchedule")], False),
    ],
)
def test_eligible(taints, ok: bool) -> None:
    assert eligible(_view("a", taints=taints).heartbeat) is ok


def test_explicit_tolerations() -> None:
    iso = Taint(key="stoker.io/dedicated", value="isolated", effect="NoSchedule")
    hb = _view("a", taints=[iso]).heartbeat
    assert eligible(hb, tolerations=[iso])
    assert not eligible(hb, tolerations=[])
    assert tolerated(Taint(key="k", effect="PreferNoSchedule"), [])
    assert not tolerated(iso, [Taint(key="stoker.io/dedicated", value="isolated", effect="NoExecute")])


def test_node_view_totals() -> None:
    v = _view("a", in_flight={"f": 2, "g": 3})
    assert v.name == "a"
    assert v.in_flight_total == 5


def test_lifecycle_events_newer_than_the_heartbeat_are_routed_on() -> None:
    """A just-prewarmed instance is routed to before the next heartbeat shows it."""
    from events import InstanceChanged, NodeHeartbeat
    from services.dispatcher.routing import NodeView, choose_node

    def beat(node: str, at: int) -> NodeHeartbeat:
        return NodeHeartbeat(node=node, incarnation=f"{node}-1", at_ms=at, instances=[])

    a, b = NodeView(beat("a", 100), 100), NodeView(beat("b", 100), 100)
    ready = InstanceChanged(
        node="b", incarnation="b-1", instance="i9", state="ready", function="f", function_version="v2", at_ms=150
    )
    b.saw(ready)
    choice = choose_node("f", "v2", {"a": a, "b": b}, affinity="a")
    assert choice is not None and (choice.node, choice.reason) == ("b", "warm")
    # An event from another incarnation, or older than the snapshot, changes nothing.
    a.saw(ready.model_copy(update={"node": "a", "incarnation": "old"}))
    assert a.instances == []
    b.beat(beat("b", 200))  # the new snapshot does not list it: the snapshot wins
    assert b.instances == []
    gone = ready.model_copy(update={"state": "gone", "at_ms": 300})
    b.saw(ready.model_copy(update={"at_ms": 250}))
    assert [i.instance for i in b.instances] == ["i9"]
    b.saw(gone)
    assert b.instances == []
