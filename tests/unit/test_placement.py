"""Unit tests of services.common.placement: Kubernetes node selectors, taints and tolerations.

The cases mirror the Kubernetes rules table (``ToleratesTaint`` and the TaintToleration /
NodeAffinity filters): operator Equal vs Exists, the empty key, the empty effect, the three
effects, several taints at once, selector subset semantics, cordoned nodes, and the overrides.
"""

from __future__ import annotations

import pytest

from events import (
    ISOLATED_TOLERATION,
    RUNTIME_TOLERATION,
    CodeSource,
    FunctionSpec,
    NodeHeartbeat,
    PlacementOverride,
    Taint,
    Toleration,
)
from events.placement import DEDICATED, ROLE
from services.common import placement
from services.common.placement import (
    effective,
    eligible,
    must_leave,
    prefers_not,
    selector_matches,
    tolerates,
    untolerated,
    why_not,
)

RUNTIME_TAINT = Taint(key=DEDICATED, value="runtime", effect="NoSchedule")
ISOLATED_TAINT = Taint(key=DEDICATED, value="isolated", effect="NoSchedule")
RUNTIME_LABELS = {ROLE: "runtime"}
ISOLATED_LABELS = {ROLE: "isolated"}


def _node(name: str = "n1", *, labels=None, taints=(), unschedulable: bool = False) -> NodeHeartbeat:
    return NodeHeartbeat(
        node=name,
        incarnation=f"{name}-1",
        labels=dict(RUNTIME_LABELS if labels is None else labels),
        taints=list(taints),
        unschedulable=unschedulable,
        at_ms=1,
    )


def _spec(**kw) -> FunctionSpec:
    return FunctionSpec(name="hello", entrypoint="handler:main", source=CodeSource(digest="sha256:" + "ab" * 32), **kw)


# ----- the constants and defaults -------------------------------------------------------------


def test_runtime_and_isolated_tolerations() -> None:
    assert RUNTIME_TOLERATION == Toleration(
        key="stoker.io/dedicated", operator="Equal", value="runtime", effect="NoSchedule"
    )
    assert ISOLATED_TOLERATION == Toleration(
        key="stoker.io/dedicated", operator="Equal", value="isolated", effect="NoSchedule"
    )
    assert (ROLE, DEDICATED) == ("stoker.io/role", "stoker.io/dedicated")


def test_toleration_defaults_are_equal_with_every_effect() -> None:
    tol = Toleration(key="k", value="v")
    assert (tol.operator, tol.effect) == ("Equal", "")
    assert tolerates(tol, Taint(key="k", value="v", effect="NoExecute"))


# ----- tolerates(): the Kubernetes table -------------------------------------------------------


@pytest.mark.parametrize(
    "toleration,taint,ok",
    [
        # Equal: key and value must both match.
        (Toleration(key="k", value="v", effect="NoSchedule"), Taint(key="k", value="v", effect="NoSchedule"), True),
        (Toleration(key="k", value="v", effect="NoSchedule"), Taint(key="k", value="w", effect="NoSchedule"), False),
        (
            Toleration(key="k", value="v", effect="NoSchedule"),
            Taint(key="other", value="v", effect="NoSchedule"),
            False,
        ),
        (Toleration(key="k", value="", effect="NoSchedule"), Taint(key="k", value="v", effect="NoSchedule"), False),
        (Toleration(key="k", value="", effect="NoSchedule"), Taint(key="k", value="", effect="NoSchedule"), True),
        # Exists: any value of the key; the toleration's value is ignored.
        (Toleration(key="k", operator="Exists"), Taint(key="k", value="anything", effect="NoSchedule"), True),
        (Toleration(key="k", operator="Exists", value="v"), Taint(key="k", value="w", effect="NoSchedule"), True),
        (Toleration(key="k", operator="Exists"), Taint(key="k", value="", effect="NoExecute"), True),
        (Toleration(key="k", operator="Exists"), Taint(key="other", value="v", effect="NoSchedule"), False),
        # Empty key + Exists: tolerates everything.
        (Toleration(key="", operator="Exists"), Taint(key="k", value="v", effect="NoSchedule"), True),
        (Toleration(key="", operator="Exists"), Taint(key="gpu", value="", effect="NoExecute"), True),
        (Toleration(key="", operator="Exists"), Taint(key="x", value="y", effect="PreferNoSchedule"), True),
        # ... but still only for its effect when it names one.
        (Toleration(key="", operator="Exists", effect="NoSchedule"), Taint(key="k", effect="NoExecute"), False),
        (Toleration(key="", operator="Exists", effect="NoExecute"), Taint(key="k", effect="NoExecute"), True),
        # Empty effect: every effect.
        (Toleration(key="k", value="v"), Taint(key="k", value="v", effect="NoSchedule"), True),
        (Toleration(key="k", value="v"), Taint(key="k", value="v", effect="PreferNoSchedule"), True),
        (Toleration(key="k", value="v"), Taint(key="k", value="v", effect="NoExecute"), True),
        # Effect mismatch: not tolerated, whatever the key and value.
        (Toleration(key="k", value="v", effect="NoSchedule"), Taint(key="k", value="v", effect="NoExecute"), False),
        (Toleration(key="k", value="v", effect="NoExecute"), Taint(key="k", value="v", effect="NoSchedule"), False),
        (
            Toleration(key="k", value="v", effect="PreferNoSchedule"),
            Taint(key="k", value="v", effect="NoSchedule"),
            False,
        ),
        (Toleration(key="k", operator="Exists", effect="NoSchedule"), Taint(key="k", effect="NoExecute"), False),
        # The runtime toleration against the stoker taints.
        (RUNTIME_TOLERATION, RUNTIME_TAINT, True),
        (RUNTIME_TOLERATION, ISOLATED_TAINT, False),
        (RUNTIME_TOLERATION, Taint(key=DEDICATED, value="runtime", effect="NoExecute"), False),
        (RUNTIME_TOLERATION, Taint(key=DEDICATED, value="", effect="NoSchedule"), False),
        (ISOLATED_TOLERATION, ISOLATED_TAINT, True),
        (ISOLATED_TOLERATION, RUNTIME_TAINT, False),
    ],
)
def test_tolerates(toleration: Toleration, taint: Taint, ok: bool) -> None:
    assert tolerates(toleration, taint) is ok


def test_keys_and_values_are_case_sensitive() -> None:
    assert not tolerates(Toleration(key="K", value="v"), Taint(key="k", value="v"))
    assert not tolerates(Toleration(key="k", value="V"), Taint(key="k", value="v"))


# ----- untolerated(), eligible(): every hard taint must be tolerated --------------------------


def test_no_taints_needs_no_toleration() -> None:
    node = _node()
    assert untolerated(node, []) == []
    assert eligible(node, RUNTIME_LABELS, [])


def test_noschedule_must_be_tolerated() -> None:
    node = _node(taints=[RUNTIME_TAINT])
    assert untolerated(node, []) == [RUNTIME_TAINT]
    assert not eligible(node, RUNTIME_LABELS, [])
    assert untolerated(node, [RUNTIME_TOLERATION]) == []
    assert eligible(node, RUNTIME_LABELS, [RUNTIME_TOLERATION])


def test_noexecute_must_be_tolerated() -> None:
    taint = Taint(key="gpu", value="true", effect="NoExecute")
    node = _node(taints=[taint])
    assert untolerated(node, [RUNTIME_TOLERATION]) == [taint]
    assert not eligible(node, RUNTIME_LABELS, [RUNTIME_TOLERATION])
    assert eligible(node, RUNTIME_LABELS, [Toleration(key="gpu", operator="Exists", effect="NoExecute")])
    # A NoSchedule toleration of the same key and value does not cover NoExecute.
    assert not eligible(node, RUNTIME_LABELS, [Toleration(key="gpu", value="true", effect="NoSchedule")])


def test_prefer_no_schedule_never_excludes_but_prefers_not_says_so() -> None:
    soft = Taint(key="maintenance", value="soon", effect="PreferNoSchedule")
    node = _node(taints=[soft])
    assert untolerated(node, []) == []
    assert eligible(node, RUNTIME_LABELS, [])
    assert prefers_not(node, [])
    assert prefers_not(node, [RUNTIME_TOLERATION])
    # Tolerated: no longer avoided.
    assert not prefers_not(node, [Toleration(key="maintenance", operator="Exists")])
    assert not prefers_not(node, [Toleration(key="maintenance", value="soon", effect="PreferNoSchedule")])
    assert not prefers_not(node, [Toleration(operator="Exists")])
    # A toleration of another effect does not count.
    assert prefers_not(node, [Toleration(key="maintenance", value="soon", effect="NoSchedule")])


def test_prefers_not_ignores_hard_taints() -> None:
    assert not prefers_not(_node(), [])
    assert not prefers_not(_node(taints=[ISOLATED_TAINT]), [])
    assert not prefers_not(_node(taints=[Taint(key="x", effect="NoExecute")]), [])


def test_multiple_taints_all_need_a_toleration() -> None:
    gpu = Taint(key="gpu", value="true", effect="NoSchedule")
    node = _node(taints=[RUNTIME_TAINT, gpu])
    assert untolerated(node, [RUNTIME_TOLERATION]) == [gpu]
    assert not eligible(node, RUNTIME_LABELS, [RUNTIME_TOLERATION])
    gpu_tol = Toleration(key="gpu", value="true", effect="NoSchedule")
    assert untolerated(node, [gpu_tol]) == [RUNTIME_TAINT]
    assert not eligible(node, RUNTIME_LABELS, [gpu_tol])
    assert eligible(node, RUNTIME_LABELS, [RUNTIME_TOLERATION, gpu_tol])
    assert eligible(node, RUNTIME_LABELS, [Toleration(operator="Exists")])
    # One toleration may cover several taints.
    assert eligible(node, RUNTIME_LABELS, [Toleration(key="", operator="Exists", effect="NoSchedule")])


def test_untolerated_lists_every_uncovered_hard_taint_in_order() -> None:
    a = Taint(key="a", effect="NoSchedule")
    b = Taint(key="b", effect="NoExecute")
    soft = Taint(key="c", effect="PreferNoSchedule")
    node = _node(taints=[a, soft, b])
    assert untolerated(node, []) == [a, b]
    assert untolerated(node, iter([Toleration(key="a", operator="Exists")])) == [b]


def test_tolerations_may_be_any_iterable() -> None:
    node = _node(taints=[RUNTIME_TAINT, Taint(key="soft", effect="PreferNoSchedule")])
    assert eligible(node, RUNTIME_LABELS, iter([RUNTIME_TOLERATION]))
    assert prefers_not(node, iter([RUNTIME_TOLERATION]))
    assert not must_leave(node, iter([RUNTIME_TOLERATION]))
    assert why_not(node, RUNTIME_LABELS, iter([RUNTIME_TOLERATION])) == "n1: eligible"


# ----- node selectors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "selector,labels,ok",
    [
        ({}, {}, True),  # an empty selector matches every node
        ({}, {"a": "b"}, True),
        ({ROLE: "runtime"}, {ROLE: "runtime"}, True),
        ({ROLE: "runtime"}, {ROLE: "runtime", "zone": "eu-1", "gpu": "true"}, True),  # a subset is enough
        ({ROLE: "runtime"}, {ROLE: "isolated"}, False),
        ({ROLE: "runtime"}, {}, False),
        ({ROLE: "runtime"}, {"other/role": "runtime"}, False),
        ({ROLE: "runtime", "zone": "eu-1"}, {ROLE: "runtime"}, False),  # every pair is needed
        ({ROLE: "runtime", "zone": "eu-1"}, {ROLE: "runtime", "zone": "eu-2"}, False),
        ({ROLE: "runtime", "zone": "eu-1"}, {ROLE: "runtime", "zone": "eu-1"}, True),
        ({"k": ""}, {"k": ""}, True),
        ({"k": ""}, {}, False),  # an empty value still needs the label
        ({ROLE: "Runtime"}, {ROLE: "runtime"}, False),
    ],
)
def test_selector_matches(selector: dict[str, str], labels: dict[str, str], ok: bool) -> None:
    assert selector_matches(selector, labels) is ok
    assert eligible(_node(labels=labels), selector, []) is ok


def test_selector_mismatch_excludes_even_with_every_toleration() -> None:
    node = _node(labels=ISOLATED_LABELS)
    assert not eligible(node, RUNTIME_LABELS, [Toleration(operator="Exists")])


# ----- cordoned nodes ------------------------------------------------------------------------


def test_cordoned_node_is_never_eligible() -> None:
    node = _node(unschedulable=True)
    assert not eligible(node, RUNTIME_LABELS, [RUNTIME_TOLERATION])
    assert not eligible(node, {}, [Toleration(operator="Exists")])
    assert eligible(_node(unschedulable=False), RUNTIME_LABELS, [])


def test_cordoned_node_instances_need_not_leave() -> None:
    """Cordoning takes no new work; unlike NoExecute, it does not evict what runs there."""
    assert not must_leave(_node(unschedulable=True), [])


# ----- effective(): spec vs override -----------------------------------------------------------


def test_function_spec_placement_defaults() -> None:
    spec = _spec()
    assert spec.node_selector == {"stoker.io/role": "runtime"}
    assert spec.tolerations == [RUNTIME_TOLERATION]
    # Defaults are fresh objects per spec.
    assert spec.node_selector is not _spec().node_selector


def test_placement_override_defaults_isolate() -> None:
    override = PlacementOverride(function="hello")
    assert override.node_selector == {"stoker.io/role": "isolated"}
    assert override.tolerations == [ISOLATED_TOLERATION]
    assert override.until_ms is None
    assert override.active(0) and override.active(10**15)


def test_override_active_until_its_end() -> None:
    override = PlacementOverride(function="hello", until_ms=1000)
    assert override.active(999)
    assert not override.active(1000)
    assert not override.active(1001)


def test_effective_without_override_is_the_spec() -> None:
    spec = _spec(node_selector={ROLE: "runtime", "zone": "a"}, tolerations=[RUNTIME_TOLERATION, ISOLATED_TOLERATION])
    assert effective(spec, None, 5) == ({ROLE: "runtime", "zone": "a"}, [RUNTIME_TOLERATION, ISOLATED_TOLERATION])
    assert effective(_spec(), None, 5) == ({ROLE: "runtime"}, [RUNTIME_TOLERATION])


def test_effective_with_active_override_replaces_both() -> None:
    spec = _spec(node_selector={ROLE: "runtime", "zone": "a"})
    forever = PlacementOverride(function="hello")
    assert effective(spec, forever, 5) == ({ROLE: "isolated"}, [ISOLATED_TOLERATION])
    later = PlacementOverride(function="hello", until_ms=10, node_selector={"gpu": "true"}, tolerations=[])
    assert effective(spec, later, 9) == ({"gpu": "true"}, [])


def test_effective_with_expired_override_is_the_spec() -> None:
    spec = _spec()
    expired = PlacementOverride(function="hello", until_ms=10)
    assert effective(spec, expired, 10) == ({ROLE: "runtime"}, [RUNTIME_TOLERATION])
    assert effective(spec, expired, 11) == ({ROLE: "runtime"}, [RUNTIME_TOLERATION])


def test_effective_returns_copies() -> None:
    spec = _spec()
    selector, tolerations = effective(spec, None, 0)
    selector["x"] = "y"
    tolerations.clear()
    assert spec.node_selector == {ROLE: "runtime"}
    assert spec.tolerations == [RUNTIME_TOLERATION]


def test_isolation_override_only_fits_isolated_nodes() -> None:
    runtime_node = _node("rt", labels=RUNTIME_LABELS, taints=[RUNTIME_TAINT])
    isolated_node = _node("iso", labels=ISOLATED_LABELS, taints=[ISOLATED_TAINT])
    spec = _spec()
    normal = effective(spec, None, 0)
    isolated = effective(spec, PlacementOverride(function="hello"), 0)
    assert [n.node for n in (runtime_node, isolated_node) if eligible(n, *normal)] == ["rt"]
    assert [n.node for n in (runtime_node, isolated_node) if eligible(n, *isolated)] == ["iso"]


# ----- why_not() -------------------------------------------------------------------------------


def test_why_not_cordoned() -> None:
    assert why_not(_node(unschedulable=True), RUNTIME_LABELS, []) == "n1: cordoned"


def test_why_not_cordoned_comes_first() -> None:
    node = _node(labels={}, taints=[ISOLATED_TAINT], unschedulable=True)
    assert why_not(node, RUNTIME_LABELS, []) == "n1: cordoned"


def test_why_not_labels() -> None:
    node = _node("n2", labels=ISOLATED_LABELS)
    assert why_not(node, RUNTIME_LABELS, []) == "n2: labels do not match {'stoker.io/role': 'runtime'}"


def test_why_not_labels_lists_only_the_missing_pairs() -> None:
    node = _node(labels={ROLE: "runtime", "zone": "b"}, taints=[ISOLATED_TAINT])
    reason = why_not(node, {ROLE: "runtime", "zone": "a", "gpu": "true"}, [])
    assert reason == "n1: labels do not match {'zone': 'a', 'gpu': 'true'}"
    assert ROLE not in reason


def test_why_not_taint() -> None:
    node = _node(taints=[RUNTIME_TAINT, ISOLATED_TAINT])
    assert why_not(node, RUNTIME_LABELS, [RUNTIME_TOLERATION]) == (
        "n1: untolerated taint stoker.io/dedicated=isolated:NoSchedule"
    )
    assert why_not(node, RUNTIME_LABELS, []) == "n1: untolerated taint stoker.io/dedicated=runtime:NoSchedule"
    gpu = _node(taints=[Taint(key="gpu", value="true", effect="NoExecute")])
    assert why_not(gpu, RUNTIME_LABELS, []) == "n1: untolerated taint gpu=true:NoExecute"


def test_why_not_eligible() -> None:
    node = _node(taints=[RUNTIME_TAINT, Taint(key="soft", effect="PreferNoSchedule")])
    assert why_not(node, RUNTIME_LABELS, [RUNTIME_TOLERATION]) == "n1: eligible"


@pytest.mark.parametrize(
    "node",
    [
        _node(),
        _node(unschedulable=True),
        _node(labels={}),
        _node(taints=[ISOLATED_TAINT]),
        _node(taints=[Taint(key="x", effect="NoExecute")]),
        _node(taints=[Taint(key="x", effect="PreferNoSchedule")]),
    ],
)
def test_why_not_agrees_with_eligible(node: NodeHeartbeat) -> None:
    reason = why_not(node, RUNTIME_LABELS, [RUNTIME_TOLERATION])
    assert reason.startswith("n1: ")
    assert (reason == "n1: eligible") is eligible(node, RUNTIME_LABELS, [RUNTIME_TOLERATION])


# ----- must_leave(): NoExecute evicts ----------------------------------------------------------


def test_must_leave_on_untolerated_noexecute() -> None:
    node = _node(taints=[RUNTIME_TAINT, Taint(key="maintenance", value="now", effect="NoExecute")])
    assert must_leave(node, [RUNTIME_TOLERATION])
    assert not must_leave(node, [RUNTIME_TOLERATION, Toleration(key="maintenance", operator="Exists")])
    assert not must_leave(node, [Toleration(key="maintenance", value="now", effect="NoExecute")])
    assert not must_leave(node, [Toleration(operator="Exists")])
    assert must_leave(node, [Toleration(key="maintenance", value="now", effect="NoSchedule")])


def test_noschedule_and_prefer_no_schedule_do_not_evict() -> None:
    assert not must_leave(_node(taints=[ISOLATED_TAINT]), [RUNTIME_TOLERATION])
    assert not must_leave(_node(taints=[Taint(key="x", effect="PreferNoSchedule")]), [])
    assert not must_leave(_node(), [])


def test_label_change_does_not_evict() -> None:
    """Like Kubernetes' IgnoredDuringExecution: selectors only matter when placing."""
    assert not must_leave(_node(labels=ISOLATED_LABELS), [RUNTIME_TOLERATION])


def test_module_exports() -> None:
    for name in ("tolerates", "untolerated", "prefers_not", "selector_matches", "effective", "eligible"):
        assert callable(getattr(placement, name))
    assert callable(placement.why_not) and callable(placement.must_leave)
