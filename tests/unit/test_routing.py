"""Unit tests of services.dispatcher.routing: eligibility and node choice.

Nodes are runtime nodes unless a test says otherwise: labelled ``stoker.io/role=runtime`` and
tainted ``stoker.io/dedicated=runtime:NoSchedule``, which functions tolerate by default.
"""

from __future__ import annotations

import pytest

from events import (
    ISOLATED_TOLERATION,
    RUNTIME_TOLERATION,
    InstanceChanged,
    InstanceSummary,
    NodeCapacity,
    NodeHeartbeat,
    PlacementOverride,
    Taint,
    Toleration,
)
from services.common import placement
from services.dispatcher.routing import Choice, NodeView, choose_node

FN, VER = "hello", "v1"
RUNTIME = {"stoker.io/role": "runtime"}
ISOLATED = {"stoker.io/role": "isolated"}
RUNTIME_TAINT = Taint(key="stoker.io/dedicated", value="runtime", effect="NoSchedule")
ISOLATED_TAINT = Taint(key="stoker.io/dedicated", value="isolated", effect="NoSchedule")
SOFT = Taint(key="maintenance", value="soon", effect="PreferNoSchedule")


def _ready(i: str, fn: str = FN, ver: str = VER, state: str = "ready") -> InstanceSummary:
    return InstanceSummary(instance=i, state=state, function=fn, function_version=ver)  # type: ignore[arg-type]


def _generic(i: str) -> InstanceSummary:
    return InstanceSummary(instance=i, state="generic")


def _view(
    name: str,
    instances=(),
    *,
    labels=None,
    taints=(RUNTIME_TAINT,),
    unschedulable: bool = False,
    in_flight=None,
    hb_in_flight: int = 0,
    max_instances: int = 8,
) -> NodeView:
    hb = NodeHeartbeat(
        node=name,
        incarnation=f"{name}-1",
        labels=dict(RUNTIME if labels is None else labels),
        instances=list(instances),
        taints=list(taints),
        unschedulable=unschedulable,
        in_flight=hb_in_flight,
        capacity=NodeCapacity(max_instances=max_instances),
        at_ms=1,
    )
    return NodeView(hb, last_seen_ms=1, in_flight=dict(in_flight or {}))


def _isolated(name: str, instances=(), **kw) -> NodeView:
    return _view(name, instances, labels=ISOLATED, taints=(ISOLATED_TAINT,), **kw)


def _nodes(*views: NodeView) -> dict[str, NodeView]:
    return {v.name: v for v in views}


def _eligible(view: NodeView, tolerations=(RUNTIME_TOLERATION,)) -> bool:
    return choose_node(FN, VER, _nodes(view), tolerations=tolerations) is not None


def test_no_nodes_is_none() -> None:
    assert choose_node(FN, VER, {}) is None


# ----- preference tiers ------------------------------------------------------------------------


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


def test_least_loaded_puts_nodes_over_capacity_last() -> None:
    # "a" is full (one more would exceed its 4 slots); "b" is busier in absolute terms but has room.
    nodes = _nodes(_view("a", hb_in_flight=4, max_instances=4), _view("b", hb_in_flight=15, max_instances=16))
    assert choose_node(FN, VER, nodes) == Choice("b", "least-loaded")
    # When every node is full the invocation still goes somewhere: the least overloaded.
    full = _nodes(_view("a", hb_in_flight=8, max_instances=4), _view("b", hb_in_flight=5, max_instances=4))
    assert choose_node(FN, VER, full) == Choice("b", "least-loaded")


def test_least_loaded_goes_by_load_before_spread() -> None:
    """The third tier is "least loaded": a node's own instances of the function only break ties.

    "a" runs one invocation of FN (its busy instance is taken by it) and nothing else: 2/8 after
    this one. "b" is running 6 invocations of other functions: 7/8. Neither has an idle instance.
    """
    nodes = _nodes(
        _view("a", [_ready("r1", state="busy")], hb_in_flight=1, in_flight={FN: 1}),
        _view("b", hb_in_flight=6),
    )
    assert choose_node(FN, VER, nodes) == Choice("a", "least-loaded")


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


def test_generic_ties_go_to_the_lower_load() -> None:
    nodes = _nodes(_view("a", [_generic("g1")], hb_in_flight=3), _view("b", [_generic("g2")], hb_in_flight=1))
    assert choose_node(FN, VER, nodes) == Choice("b", "generic")


# ----- spread ----------------------------------------------------------------------------------


def test_spread_generic_goes_to_the_node_with_fewer_instances_of_the_function() -> None:
    # Both have an idle generic instance; "a" already runs FN (an older version) and has more generics.
    nodes = _nodes(
        _view("a", [_generic("g1"), _generic("g2"), _ready("r1", ver="old")]),
        _view("b", [_generic("g3")]),
    )
    assert choose_node(FN, VER, nodes) == Choice("b", "generic")


def test_spread_counts_this_dispatchers_in_flight_invocations_of_the_function() -> None:
    nodes = _nodes(_view("a", [_generic("g1"), _generic("g2")], in_flight={FN: 1}), _view("b", [_generic("g3")]))
    assert choose_node(FN, VER, nodes) == Choice("b", "generic")


def test_spread_ignores_instances_of_other_functions() -> None:
    nodes = _nodes(
        _view("a", [_generic("g1"), _generic("g2"), _ready("r1", fn="other")]),
        _view("b", [_generic("g3")]),
    )
    assert choose_node(FN, VER, nodes) == Choice("a", "generic")


# ----- affinity --------------------------------------------------------------------------------


def test_affinity_breaks_warm_ties() -> None:
    nodes = _nodes(_view("a", [_ready("r1")]), _view("b", [_ready("r2")]))
    assert choose_node(FN, VER, nodes, affinity="b") == Choice("b", "warm")
    assert choose_node(FN, VER, nodes, affinity="a") == Choice("a", "warm")


def test_affinity_breaks_generic_ties_before_spread() -> None:
    nodes = _nodes(_view("a", [_generic("g1"), _ready("r1", ver="old")]), _view("b", [_generic("g2")]))
    assert choose_node(FN, VER, nodes) == Choice("b", "generic")
    assert choose_node(FN, VER, nodes, affinity="a") == Choice("a", "generic")


def test_affinity_does_not_beat_generic_elsewhere() -> None:
    # Without an idle instance, the node that last got the version is no better than any other.
    nodes = _nodes(_view("a"), _view("b", [_generic("g")]))
    assert choose_node(FN, VER, nodes, affinity="a") == Choice("b", "generic")


def test_affinity_does_not_beat_warm_elsewhere() -> None:
    nodes = _nodes(_view("a"), _view("b", [_ready("r")]))
    assert choose_node(FN, VER, nodes, affinity="a") == Choice("b", "warm")


def test_affinity_ignored_when_node_is_full() -> None:
    nodes = _nodes(_view("a", hb_in_flight=4, max_instances=4), _view("b", [_generic("g")]))
    assert choose_node(FN, VER, nodes, affinity="a") == Choice("b", "generic")


def test_affinity_ignored_when_unknown_or_ineligible() -> None:
    nodes = _nodes(_view("a", taints=[ISOLATED_TAINT]), _view("b"))
    assert choose_node(FN, VER, nodes, affinity="a") == Choice("b", "least-loaded")
    assert choose_node(FN, VER, nodes, affinity="gone") == Choice("b", "least-loaded")


# ----- eligibility: taints ---------------------------------------------------------------------


def test_untolerated_noschedule_taint_never_chosen() -> None:
    # The tainted node is the best on every count: warm, generic and idle.
    nodes = _nodes(
        _view("a", [_ready("r1"), _ready("r2"), _generic("g")], taints=[ISOLATED_TAINT]), _view("b", hb_in_flight=7)
    )
    assert choose_node(FN, VER, nodes) == Choice("b", "least-loaded")
    assert choose_node(FN, VER, nodes, affinity="a") == Choice("b", "least-loaded")


def test_only_tainted_nodes_gives_none() -> None:
    gpu = Taint(key="gpu", effect="NoExecute")
    nodes = _nodes(_view("a", [_ready("r")], taints=[ISOLATED_TAINT]), _view("b", taints=[gpu]))
    assert choose_node(FN, VER, nodes) is None


def test_runtime_taint_tolerated_by_default() -> None:
    nodes = _nodes(_view("a", [_ready("r")], taints=[RUNTIME_TAINT]))
    assert choose_node(FN, VER, nodes) == Choice("a", "warm")
    assert placement.tolerates(RUNTIME_TOLERATION, RUNTIME_TAINT)
    assert RUNTIME_TOLERATION == Toleration(
        key="stoker.io/dedicated", operator="Equal", value="runtime", effect="NoSchedule"
    )


def test_prefer_noschedule_does_not_exclude() -> None:
    nodes = _nodes(_view("a", [_ready("r")], taints=[SOFT]))
    assert choose_node(FN, VER, nodes) == Choice("a", "warm")


def test_runtime_taint_with_other_effect_is_not_tolerated() -> None:
    execute = Taint(key="stoker.io/dedicated", value="runtime", effect="NoExecute")
    assert not _eligible(_view("a", taints=[execute]))


@pytest.mark.parametrize(
    "taints,ok",
    [
        ([], True),
        ([RUNTIME_TAINT], True),
        ([Taint(key="x", effect="PreferNoSchedule")], True),
        ([RUNTIME_TAINT, Taint(key="x", effect="PreferNoSchedule")], True),
        ([RUNTIME_TAINT, Taint(key="x", value="y", effect="NoSchedule")], False),
        ([ISOLATED_TAINT], False),
        ([Taint(key="stoker.io/dedicated", value="", effect="NoSchedule")], False),
        ([Taint(key="stoker.io/dedicated", value="runtime", effect="NoExecute")], False),
    ],
)
def test_eligible(taints, ok: bool) -> None:
    assert _eligible(_view("a", taints=taints)) is ok


def test_explicit_tolerations() -> None:
    iso = _view("a", taints=[ISOLATED_TAINT])
    assert _eligible(iso, tolerations=[ISOLATED_TOLERATION])
    assert not _eligible(iso, tolerations=[])
    assert not _eligible(iso)  # the default tolerates the runtime taint only
    assert _eligible(iso, tolerations=[Toleration(key="stoker.io/dedicated", operator="Exists")])
    assert _eligible(iso, tolerations=[Toleration(operator="Exists")])
    assert not _eligible(iso, tolerations=[ISOLATED_TOLERATION.model_copy(update={"effect": "NoExecute"})])
    # Explicit tolerations replace the default: the runtime taint is no longer tolerated.
    assert not _eligible(_view("b"), tolerations=[ISOLATED_TOLERATION])
    assert _eligible(_view("b", taints=[]), tolerations=[])
    # Any iterable will do.
    assert _eligible(iso, tolerations=iter([ISOLATED_TOLERATION]))


# ----- eligibility: selectors and cordons ------------------------------------------------------


def test_selector_mismatch_excludes() -> None:
    # The best node on every count has the wrong role, or none at all.
    nodes = _nodes(
        _view("a", [_ready("r1"), _ready("r2")], labels=ISOLATED),
        _view("b", [_generic("g1"), _generic("g2")], labels={}),
        _view("c", hb_in_flight=7),
    )
    assert choose_node(FN, VER, nodes) == Choice("c", "least-loaded")
    assert choose_node(FN, VER, nodes, affinity="a") == Choice("c", "least-loaded")
    del nodes["c"]
    assert choose_node(FN, VER, nodes) is None


def test_default_selector_is_the_runtime_role() -> None:
    nodes = _nodes(_view("a", [_ready("r")], labels={"stoker.io/role": "runtime", "zone": "eu-1"}))
    assert choose_node(FN, VER, nodes) == Choice("a", "warm")
    assert choose_node(FN, VER, nodes, selector=None) == Choice("a", "warm")
    assert choose_node(FN, VER, _nodes(_view("b", labels={"role": "runtime"}))) is None


def test_explicit_selector() -> None:
    nodes = _nodes(
        _view("a", [_ready("r")], labels={"stoker.io/role": "runtime", "zone": "eu-1"}),
        _view("b", labels={"stoker.io/role": "runtime", "zone": "eu-2"}),
    )
    assert choose_node(FN, VER, nodes, selector={"zone": "eu-2"}) == Choice("b", "least-loaded")
    assert choose_node(FN, VER, nodes, selector={"zone": "eu-3"}) is None
    # An empty selector matches every node (taints still apply).
    assert choose_node(FN, VER, nodes, selector={}) == Choice("a", "warm")
    unlabelled = _nodes(_view("c", [_ready("r")], labels={}))
    assert choose_node(FN, VER, unlabelled, selector={}) == Choice("c", "warm")
    assert choose_node(FN, VER, unlabelled) is None


def test_cordoned_node_excluded() -> None:
    nodes = _nodes(
        _view("a", [_ready("r1"), _generic("g")], unschedulable=True),
        _view("b", hb_in_flight=7),
    )
    assert choose_node(FN, VER, nodes) == Choice("b", "least-loaded")
    assert choose_node(FN, VER, nodes, affinity="a") == Choice("b", "least-loaded")
    # Even with every toleration and no selector.
    assert choose_node(FN, VER, nodes, selector={}, tolerations=[Toleration(operator="Exists")]) == Choice(
        "b", "least-loaded"
    )
    del nodes["b"]
    assert choose_node(FN, VER, nodes) is None


# ----- PreferNoSchedule: last in every tier ----------------------------------------------------


def test_prefer_no_schedule_is_last_among_warm_nodes() -> None:
    nodes = _nodes(
        _view("a", [_ready("r1"), _ready("r2"), _ready("r3")], taints=[RUNTIME_TAINT, SOFT]),
        _view("b", [_ready("r4")], hb_in_flight=5),
    )
    assert choose_node(FN, VER, nodes) == Choice("b", "warm")
    assert choose_node(FN, VER, nodes, affinity="a") == Choice("b", "warm")


def test_prefer_no_schedule_is_last_among_generic_nodes() -> None:
    nodes = _nodes(
        _view("a", [_generic("g1"), _generic("g2"), _generic("g3")], taints=[RUNTIME_TAINT, SOFT]),
        _view("b", [_generic("g4"), _ready("r", ver="old")], hb_in_flight=5),
    )
    assert choose_node(FN, VER, nodes) == Choice("b", "generic")
    assert choose_node(FN, VER, nodes, affinity="a") == Choice("b", "generic")


def test_prefer_no_schedule_is_last_among_least_loaded_nodes() -> None:
    nodes = _nodes(_view("a", taints=[RUNTIME_TAINT, SOFT]), _view("b", hb_in_flight=6))
    assert choose_node(FN, VER, nodes) == Choice("b", "least-loaded")


def test_prefer_no_schedule_does_not_change_the_tiers() -> None:
    # A warm instance on an avoided node still beats a generic one elsewhere (last *within* the tier).
    nodes = _nodes(_view("a", [_ready("r")], taints=[RUNTIME_TAINT, SOFT]), _view("b", [_generic("g")]))
    assert choose_node(FN, VER, nodes) == Choice("a", "warm")
    nodes = _nodes(_view("a", [_generic("g")], taints=[SOFT]), _view("b"))
    assert choose_node(FN, VER, nodes) == Choice("a", "generic")


def test_prefer_no_schedule_used_when_nothing_else_is_eligible() -> None:
    nodes = _nodes(_view("a", taints=[RUNTIME_TAINT, SOFT]), _view("b", taints=[ISOLATED_TAINT]))
    assert choose_node(FN, VER, nodes) == Choice("a", "least-loaded")


def test_tolerated_prefer_no_schedule_is_not_avoided() -> None:
    nodes = _nodes(
        _view("a", [_ready("r1"), _ready("r2")], taints=[RUNTIME_TAINT, SOFT]),
        _view("b", [_ready("r3")]),
    )
    tolerations = [RUNTIME_TOLERATION, Toleration(key="maintenance", operator="Exists")]
    assert choose_node(FN, VER, nodes, tolerations=tolerations) == Choice("a", "warm")
    assert choose_node(FN, VER, nodes) == Choice("b", "warm")


# ----- isolation override ----------------------------------------------------------------------


def test_isolation_override_routes_only_to_isolated_nodes() -> None:
    override = PlacementOverride(function=FN)
    selector, tolerations = override.node_selector, override.tolerations
    nodes = _nodes(
        _view("rt", [_ready("r1"), _ready("r2"), _generic("g")]),  # the best runtime node
        _isolated("iso-b", hb_in_flight=3),
        _isolated("iso-a", hb_in_flight=5),
        # Isolated in name only: labelled, but with the runtime taint; or tainted but unlabelled.
        _view("fake1", labels=ISOLATED),
        _view("fake2", labels=RUNTIME, taints=[ISOLATED_TAINT]),
    )
    assert choose_node(FN, VER, nodes, selector=selector, tolerations=tolerations) == Choice("iso-b", "least-loaded")
    assert choose_node(FN, VER, nodes, selector=selector, tolerations=tolerations, affinity="rt") == Choice(
        "iso-b", "least-loaded"
    )
    # Warm instances on isolated nodes are preferred there as anywhere.
    nodes["iso-a"] = _isolated("iso-a", [_ready("r3")], hb_in_flight=5)
    assert choose_node(FN, VER, nodes, selector=selector, tolerations=tolerations) == Choice("iso-a", "warm")
    # Without the override the function never lands on an isolated node.
    assert choose_node(FN, VER, nodes) == Choice("rt", "warm")
    del nodes["rt"]
    assert choose_node(FN, VER, nodes) is None


def test_isolation_override_without_isolated_nodes_gives_none() -> None:
    override = PlacementOverride(function=FN)
    selector, tolerations = override.node_selector, override.tolerations
    nodes = _nodes(_view("rt", [_ready("r1")]), _view("other", labels={}, taints=[]))
    assert choose_node(FN, VER, nodes, selector=selector, tolerations=tolerations) is None


# ----- NodeView --------------------------------------------------------------------------------


def test_node_view_totals() -> None:
    v = _view("a", in_flight={"f": 2, "g": 3})
    assert v.name == "a"
    assert v.in_flight_total == 5


def _beat(node: str, at: int, instances=()) -> NodeHeartbeat:
    return NodeHeartbeat(
        node=node, incarnation=f"{node}-1", at_ms=at, instances=list(instances), labels=RUNTIME, taints=[RUNTIME_TAINT]
    )


def test_lifecycle_events_newer_than_the_heartbeat_are_routed_on() -> None:
    """A just-prewarmed instance is routed to before the next heartbeat shows it."""
    a, b = NodeView(_beat("a", 100), 100), NodeView(_beat("b", 100), 100)
    ready = InstanceChanged(
        node="b", incarnation="b-1", instance="i9", state="ready", function="f", function_version="v2", at_ms=150
    )
    b.saw(ready)
    choice = choose_node("f", "v2", {"a": a, "b": b}, affinity="a")
    assert choice is not None and (choice.node, choice.reason) == ("b", "warm")
    # An event from another incarnation, or older than the snapshot, changes nothing.
    a.saw(ready.model_copy(update={"node": "a", "incarnation": "old"}))
    assert a.instances == []
    a.saw(ready.model_copy(update={"node": "a", "incarnation": "a-1", "at_ms": 100}))
    assert a.instances == []
    b.beat(_beat("b", 200))  # the new snapshot does not list it: the snapshot wins
    assert b.instances == []
    assert b.last_seen_ms == 200
    gone = ready.model_copy(update={"state": "gone", "at_ms": 300})
    b.saw(ready.model_copy(update={"at_ms": 250}))
    assert [i.instance for i in b.instances] == ["i9"]
    b.saw(gone)
    assert b.instances == []


def test_lifecycle_event_replaces_the_snapshot_entry() -> None:
    view = NodeView(_beat("a", 100, [_generic("g1"), _generic("g2")]), 100)
    assert choose_node(FN, VER, _nodes(view)) == Choice("a", "generic")
    view.saw(
        InstanceChanged(
            node="a", incarnation="a-1", instance="g1", state="ready", function=FN, function_version=VER, at_ms=110
        )
    )
    assert sorted((i.instance, i.state) for i in view.instances) == [("g1", "ready"), ("g2", "generic")]
    assert choose_node(FN, VER, _nodes(view)) == Choice("a", "warm")
    # The warm instance went away before the next heartbeat: not warm any more.
    view.saw(InstanceChanged(node="a", incarnation="a-1", instance="g1", state="gone", at_ms=120))
    assert [i.instance for i in view.instances] == ["g2"]
    assert choose_node(FN, VER, _nodes(view)) == Choice("a", "generic")


def test_heartbeat_keeps_events_newer_than_itself() -> None:
    view = NodeView(_beat("a", 100), 100)
    early = InstanceChanged(node="a", incarnation="a-1", instance="i1", state="generic", at_ms=150)
    late = InstanceChanged(node="a", incarnation="a-1", instance="i2", state="generic", at_ms=250)
    view.saw(early)
    view.saw(late)
    assert sorted(i.instance for i in view.instances) == ["i1", "i2"]
    view.beat(_beat("a", 200, [_generic("i1")]))
    assert sorted(i.instance for i in view.instances) == ["i1", "i2"]
    assert set(view.recent) == {"i2"}


def test_a_view_counts_each_instance_once_per_question() -> None:
    view = _view("runtime-0", [_generic("g1"), _generic("g2"), _ready("r1"), _ready("b1", state="busy")])
    assert view.count("generic") == 2
    assert view.count("ready", FN, VER) == 1 and view.count("busy", FN, VER) == 1
    assert view.count("ready", FN, "other-version") == 0
    assert view.count("", FN) == 2  # of the function, in any state
