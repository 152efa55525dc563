"""Unit tests of services.poolmgr.prewarm: target spec, supersession, holding and spreading."""

from __future__ import annotations

import pytest

from events import (
    CodeSource,
    FunctionSpec,
    InstanceSummary,
    NodeCapacity,
    NodeHeartbeat,
    PlacementOverride,
    PrewarmRequested,
    Taint,
    Toleration,
    now_ms,
)
from events.placement import ISOLATED_TOLERATION
from services.common import placement
from services.poolmgr.prewarm import PendingPrewarm, activated, holding, spread, superseded, target_spec

OLD_DIGEST = "sha256:" + "1" * 64
NEW_DIGEST = "sha256:" + "2" * 64
OLD_COMMIT = "a" * 40
NEW_COMMIT = "b" * 40
ISOLATED = Taint(key="stoker.io/dedicated", value="isolated", effect="NoSchedule")
RUNTIME = Taint(key="stoker.io/dedicated", value="runtime", effect="NoSchedule")
RUNTIME_LABELS = {"stoker.io/role": "runtime"}
ISOLATED_LABELS = {"stoker.io/role": "isolated"}


def _spec(*, pushed_ms: int = 1000, revision: int = 3) -> FunctionSpec:
    return FunctionSpec(
        name="hello",
        entrypoint="handler:main",
        revision=revision,
        memory_mb=512,
        timeout_s=12.5,
        concurrency=7,
        env={"A": "1"},
        idle_s=90.0,
        max_invocations=50,
        prewarm_on_commit=2,
        updated_ms=1,
        source=CodeSource(
            kind="git",
            digest=OLD_DIGEST,
            uri="file:///art/old.zip",
            size=1234,
            build_id="build-old",
            pushed_ms=pushed_ms,
            git_url="https://github.com/o/r.git",
            git_branch="dev",
            git_path="fns/hello",
            git_commit=OLD_COMMIT,
        ),
    )


def _request(**kw) -> PrewarmRequested:
    fields = {
        "function": "hello",
        "count": 2,
        "digest": NEW_DIGEST,
        "uri": "file:///art/new.zip",
        "commit": NEW_COMMIT,
        "build_id": "build-new",
        "pushed_ms": 2000,
        "activate": True,
    }
    fields.update(kw)
    return PrewarmRequested(**fields)


# --- target_spec -----------------------------------------------------------------------------------


def test_target_spec_swaps_the_artifact_into_the_source() -> None:
    current = _spec()
    target = target_spec(current, _request())
    src = target.source
    assert src.digest == NEW_DIGEST
    assert src.uri == "file:///art/new.zip"
    assert src.git_commit == NEW_COMMIT
    assert src.build_id == "build-new"
    assert src.pushed_ms == 2000
    assert src.size is None  # the old artifact's size says nothing about the new one
    assert target.code_version == NEW_COMMIT[:12]


def test_target_spec_keeps_everything_else() -> None:
    current = _spec()
    target = target_spec(current, _request())
    swapped = {"digest", "uri", "git_commit", "build_id", "pushed_ms", "size"}
    for key, value in current.source.model_dump().items():
        if key not in swapped:
            assert getattr(target.source, key) == value, key
    assert target.model_dump(exclude={"source"}) == current.model_dump(exclude={"source"})
    assert target.revision == current.revision  # activation bumps it, not the target
    # the current spec is untouched
    assert current.source.digest == OLD_DIGEST and current.source.git_commit == OLD_COMMIT


def test_target_spec_keeps_the_commit_when_the_request_has_none() -> None:
    target = target_spec(_spec(), _request(commit=None))
    assert target.source.digest == NEW_DIGEST
    assert target.source.git_commit == OLD_COMMIT


@pytest.mark.parametrize("missing", [{"digest": None}, {"uri": None}, {"digest": None, "uri": None}])
def test_request_without_an_artifact_targets_the_current_spec(missing: dict) -> None:
    current = _spec()
    assert target_spec(current, _request(**missing)) == current


def test_plain_prewarm_of_the_active_version() -> None:
    current = _spec()
    request = PrewarmRequested(function="hello", count=3)
    assert target_spec(current, request) is current
    assert not superseded(current, request)


# --- superseded / activated ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("active_pushed", "request_pushed", "activate", "expected"),
    [
        (3000, 2000, True, True),  # a later push is already active
        (2000, 2000, True, False),  # the same push
        (1000, 2000, True, False),  # an earlier push is active: this one may replace it
        (0, 2000, True, False),
        (3000, 2000, False, False),  # plain prewarms never become active anyway
        (1000, 2000, False, False),
    ],
)
def test_superseded(active_pushed: int, request_pushed: int, activate: bool, expected: bool) -> None:
    current = _spec(pushed_ms=active_pushed)
    assert superseded(current, _request(pushed_ms=request_pushed, activate=activate)) is expected


def test_activated_bumps_the_revision_of_the_current_spec() -> None:
    current = _spec(revision=3)
    target = target_spec(current, _request())
    active = activated(current, target)
    assert active.revision == 4
    assert active.updated_ms > current.updated_ms
    assert active.source == target.source
    assert active.model_dump(exclude={"revision", "updated_ms"}) == target.model_dump(
        exclude={"revision", "updated_ms"}
    )


def test_activated_counts_from_the_current_revision_not_the_targets() -> None:
    current = _spec(revision=7)
    stale_target = target_spec(_spec(revision=2), _request())
    assert activated(current, stale_target).revision == 8


# --- holding ---------------------------------------------------------------------------------------


def _inst(i: str, state: str, fn: str | None = None, ver: str | None = None) -> InstanceSummary:
    return InstanceSummary(instance=i, state=state, function=fn, function_version=ver)  # type: ignore[arg-type]


def _node(
    name: str, instances=(), *, labels=None, taints=(RUNTIME,), unschedulable: bool = False, max_instances: int = 8
) -> NodeHeartbeat:
    """A runtime node unless told otherwise: the runtime role label and the runtime taint."""
    return NodeHeartbeat(
        node=name,
        incarnation=f"{name}-1",
        instances=list(instances),
        labels=dict(RUNTIME_LABELS if labels is None else labels),
        taints=list(taints),
        unschedulable=unschedulable,
        capacity=NodeCapacity(max_instances=max_instances),
        at_ms=1,
    )


def _isolated(name: str, instances=(), **kw) -> NodeHeartbeat:
    return _node(name, instances, labels=ISOLATED_LABELS, taints=(ISOLATED,), **kw)


def test_holding_counts_ready_and_busy_instances_of_the_version_across_nodes() -> None:
    nodes = [
        _node(
            "n1",
            [
                _inst("a", "ready", "hello", "v2"),
                _inst("b", "busy", "hello", "v2"),
                _inst("c", "generic"),
                _inst("d", "ready", "hello", "v1"),  # another version
                _inst("e", "specializing", "hello", "v2"),  # not loaded yet
            ],
        ),
        _node(
            "n2",
            [
                _inst("f", "ready", "hello", "v2"),
                _inst("g", "ready", "other", "v2"),  # another function
                _inst("h", "recycling", "hello", "v2"),
                _inst("i", "gone", "hello", "v2"),
                _inst("j", "starting"),
            ],
        ),
        _node("n3"),
    ]
    assert holding(nodes, "hello", "v2") == 3
    assert holding(nodes, "hello", "v1") == 1
    assert holding(nodes, "other", "v2") == 1
    assert holding(nodes, "other", "v1") == 0
    assert holding([], "hello", "v2") == 0
    assert holding(iter(nodes), "hello", "v2") == 3


# --- spread ----------------------------------------------------------------------------------------


def test_spread_of_nothing_is_empty() -> None:
    assert spread([_node("n1")], 0) == {}
    assert spread([_node("n1")], -3) == {}
    assert spread([], 5) == {}


def test_spread_never_uses_isolated_nodes() -> None:
    assert spread([_node("iso", taints=[ISOLATED])], 3) == {}
    nodes = [_node("iso", [_inst("g1", "generic"), _inst("g2", "generic")], taints=[ISOLATED]), _node("ok")]
    assert spread(nodes, 5) == {"ok": 5}


def test_spread_tolerates_the_runtime_taint_and_prefer_no_schedule() -> None:
    soft = Taint(key="stoker.io/dedicated", value="isolated", effect="PreferNoSchedule")
    nodes = [_node("rt", taints=[RUNTIME]), _node("soft", taints=[soft])]
    assert spread(nodes, 2) == {"rt": 1, "soft": 1}
    other = Taint(key="gpu", value="true", effect="NoExecute")
    assert spread([_node("gpu", taints=[other])], 1) == {}
    assert spread([_node("gpu", taints=[RUNTIME, other])], 1) == {}


def test_spread_puts_the_first_instances_on_the_node_with_most_generic_instances() -> None:
    nodes = [
        _node("few", [_inst("a", "generic")]),
        _node("many", [_inst("b", "generic"), _inst("c", "generic"), _inst("d", "generic")]),
        _node("none"),
    ]
    assert spread(nodes, 1) == {"many": 1}
    assert spread(nodes, 2) == {"many": 1, "few": 1}
    assert spread(nodes, 3) == {"many": 1, "few": 1, "none": 1}


def test_spread_breaks_generic_ties_by_free_room() -> None:
    nodes = [
        _node("full", [_inst("a", "generic"), *(_inst(f"r{i}", "ready", "x", "v") for i in range(6))]),
        _node("roomy", [_inst("b", "generic")]),
    ]
    assert spread(nodes, 1) == {"roomy": 1}
    assert spread([_node("small", max_instances=2), _node("big", max_instances=16)], 1) == {"big": 1}


def test_spread_is_round_robin_over_the_ordered_nodes() -> None:
    nodes = [_node("n1", [_inst("a", "generic")]), _node("n2", [_inst("b", "generic"), _inst("c", "generic")])]
    assert spread(nodes, 5) == {"n2": 3, "n1": 2}
    assert sum(spread(nodes, 17).values()) == 17
    plan = spread([_node(f"n{i}") for i in range(4)], 10)
    assert sorted(plan.values()) == [2, 2, 3, 3]
    assert sum(plan.values()) == 10


def test_spread_accepts_any_iterable() -> None:
    assert spread(iter([_node("a"), _node("b", taints=[ISOLATED])]), 2) == {"a": 2}
    assert spread([_isolated("i")], 1, ISOLATED_LABELS, iter([ISOLATED_TOLERATION])) == {"i": 1}


def test_spread_needs_the_runtime_role_by_default() -> None:
    generics = [_inst("g1", "generic"), _inst("g2", "generic")]
    nodes = [
        _node("unlabelled", generics, labels={}),
        _node("builder", generics, labels={"stoker.io/role": "builder"}),
        _node("rt", labels={"stoker.io/role": "runtime", "zone": "eu-1"}),
    ]
    assert spread(nodes, 3) == {"rt": 3}
    assert spread(nodes, 3, None) == {"rt": 3}
    assert spread(nodes[:2], 3) == {}


def test_spread_skips_cordoned_nodes() -> None:
    nodes = [_node("cordoned", [_inst("g1", "generic"), _inst("g2", "generic")], unschedulable=True), _node("ok")]
    assert spread(nodes, 4) == {"ok": 4}
    assert spread(nodes[:1], 1) == {}
    assert spread(nodes[:1], 1, {}, [Toleration(operator="Exists")]) == {}


def test_spread_with_explicit_selector_and_tolerations() -> None:
    nodes = [
        _node("rt", [_inst("g1", "generic")]),
        _node("gpu", labels={"stoker.io/role": "runtime", "gpu": "true"}),
    ]
    assert spread(nodes, 2, {"gpu": "true"}) == {"gpu": 2}
    assert spread(nodes, 2, {"gpu": "false"}) == {}
    # An empty selector matches every node; explicit tolerations replace the runtime default.
    assert spread(nodes, 2, {}) == {"rt": 1, "gpu": 1}
    assert spread(nodes, 2, {}, []) == {}
    assert spread([_node("bare", labels={}, taints=[])], 1, {}, []) == {"bare": 1}


def test_spread_with_the_isolation_override_uses_isolated_nodes_only() -> None:
    override = PlacementOverride(function="hello")
    spec = _spec()
    selector, tolerations = placement.effective(spec, override, now_ms())
    generics = [_inst("g1", "generic"), _inst("g2", "generic"), _inst("g3", "generic")]
    nodes = [
        _node("rt", generics),
        _isolated("iso-1", [_inst("g4", "generic")]),
        _isolated("iso-2"),
        _node("half", labels=ISOLATED_LABELS),  # isolated label, runtime taint
        _isolated("iso-cordoned", generics, unschedulable=True),
    ]
    assert spread(nodes, 3, selector, tolerations) == {"iso-1": 2, "iso-2": 1}
    # Without the override the isolated nodes are never used.
    assert spread(nodes, 3, *placement.effective(spec, None, now_ms())) == {"rt": 3}
    assert spread(nodes, 3) == {"rt": 3}
    # An ended override changes nothing.
    ended = PlacementOverride(function="hello", until_ms=1)
    assert spread(nodes, 3, *placement.effective(spec, ended, now_ms())) == {"rt": 3}


def test_spread_puts_prefer_no_schedule_nodes_last() -> None:
    """PreferNoSchedule lowers the preference in prewarming too, as the dispatcher does in routing.

    Otherwise the prewarmed (warm) instances land on the avoided node, and the dispatcher, which
    prefers warm instances over all else, routes the function there after all.
    """
    soft = Taint(key="maintenance", value="soon", effect="PreferNoSchedule")
    nodes = [
        _node("soft", [_inst("g1", "generic"), _inst("g2", "generic"), _inst("g3", "generic")], taints=[RUNTIME, soft]),
        _node("plain", [_inst("g4", "generic")]),
    ]
    assert spread(nodes, 1) == {"plain": 1}
    # Still used when there is more to place than preferred nodes, and when tolerated.
    assert sum(spread(nodes, 2).values()) == 2
    tolerant = [*_spec().tolerations, Toleration(key="maintenance", operator="Exists")]
    assert spread(nodes, 1, None, tolerant) == {"soft": 1}


# --- PendingPrewarm --------------------------------------------------------------------------------


def _pending(wanted: int) -> PendingPrewarm:
    current = _spec()
    request = _request(count=wanted)
    return PendingPrewarm(request=request, target=target_spec(current, request), wanted=wanted)


def test_pending_prewarm_is_done_when_enough_instances_are_ready() -> None:
    pending = _pending(2)
    assert pending.version == NEW_COMMIT[:12]
    assert not pending.done
    pending.ready.add("i1")
    assert not pending.done
    pending.ready.add("i1")  # the same instance twice counts once
    assert not pending.done
    pending.ready.add("i2")
    assert pending.done
    pending.ready.add("i3")
    assert pending.done


def test_pending_prewarm_is_done_on_failure() -> None:
    pending = _pending(3)
    pending.failure = "artifact fetch failed"
    assert pending.done
    assert not _pending(3).done


def test_pending_prewarms_have_their_own_ready_sets() -> None:
    a, b = _pending(1), _pending(1)
    a.ready.add("i1")
    assert a.done and not b.done
    assert a.started_ms > 0
