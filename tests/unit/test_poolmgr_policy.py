"""Unit tests of services.poolmgr.policy: generic pool target and keep-alive decisions."""

from __future__ import annotations

from events import CodeSource, FunctionSpec, InstanceSummary, NodeCapacity, NodeHeartbeat
from services.poolmgr.keepalive import FixedPolicy
from services.poolmgr.policy import PoolPolicy, RecycleDecision, generic_target, keepalive_decisions

DIGEST = "sha256:" + "12" * 32
VER = "121212121212"


def _spec(name: str = "hello", idle_s: float | None = 60.0, digest: str = DIGEST) -> FunctionSpec:
    return FunctionSpec(name=name, entrypoint="handler:main", source=CodeSource(digest=digest), idle_s=idle_s)


def _hb(*instances: InstanceSummary, max_instances: int = 8) -> NodeHeartbeat:
    return NodeHeartbeat(
        node="n", incarnation="i", instances=list(instances), capacity=NodeCapacity(max_instances=max_instances)
    )


def _inst(
    i: str, state: str = "ready", fn: str | None = "hello", ver: str | None = VER, idle_ms: int = 0, uses: int = 1
) -> InstanceSummary:
    return InstanceSummary(instance=i, state=state, function=fn, function_version=ver, idle_ms=idle_ms, uses=uses)  # type: ignore[arg-type]


def keepalive_expired(
    hb: NodeHeartbeat,
    specs: dict[str, FunctionSpec],
    policy: PoolPolicy,
    protected: set[tuple[str, str]] | None = None,
) -> list[RecycleDecision]:
    """The decisions with nothing learned yet, at time 0 (these tests only use explicit keep-alives)."""
    return keepalive_decisions(hb, specs, policy, {}, protected or set(), now_ms=0)


def test_spec_version_matches_test_constant() -> None:
    assert _spec().code_version == VER


def test_generic_target() -> None:
    assert generic_target(_hb(), PoolPolicy(generic_per_node=2)) == 2
    assert generic_target(_hb(max_instances=1), PoolPolicy(generic_per_node=2)) == 1
    assert generic_target(_hb(max_instances=0), PoolPolicy(generic_per_node=2)) == 0
    assert generic_target(_hb(), PoolPolicy(generic_per_node=0)) == 0
    assert generic_target(_hb(), PoolPolicy(generic_per_node=-3)) == 0


def test_idle_past_idle_s_is_recycled() -> None:
    specs = {"hello": _spec(idle_s=60.0)}
    hb = _hb(_inst("fresh", idle_ms=60_000), _inst("stale", idle_ms=60_001), _inst("older", idle_ms=600_000))
    decisions = keepalive_expired(hb, specs, PoolPolicy())
    assert [d.instance for d in decisions] == ["stale", "older"]
    assert all(d.function == "hello" for d in decisions)
    assert decisions[0].reason == "keep-alive (idle_s=60): idle 60s, window 0-60s"


def test_function_without_idle_s_gets_the_platform_policy() -> None:
    specs = {"hello": _spec(idle_s=None)}
    hb = _hb(_inst("kept", idle_ms=600_000), _inst("gone", idle_ms=600_001))
    decisions = keepalive_expired(hb, specs, PoolPolicy(keepalive=FixedPolicy(600.0)))
    assert decisions == [RecycleDecision("gone", "hello", "keep-alive (fixed): idle 600s, window 0-600s")]


def test_each_function_has_its_own_keepalive() -> None:
    specs = {"short": _spec("short", idle_s=1.0), "long": _spec("long", idle_s=1000.0)}
    hb = _hb(_inst("s", fn="short", idle_ms=5_000), _inst("l", fn="long", idle_ms=5_000))
    assert [d.instance for d in keepalive_expired(hb, specs, PoolPolicy())] == ["s"]


def test_deleted_function_is_recycled() -> None:
    hb = _hb(_inst("orphan", fn="gone", idle_ms=0), _inst("kept", idle_ms=0))
    decisions = keepalive_expired(hb, {"hello": _spec()}, PoolPolicy())
    assert decisions == [RecycleDecision("orphan", "gone", "function deleted")]


def test_old_version_is_recycled() -> None:
    hb = _hb(_inst("old", ver="000000000000", idle_ms=0), _inst("new", idle_ms=0))
    decisions = keepalive_expired(hb, {"hello": _spec()}, PoolPolicy())
    assert decisions == [RecycleDecision("old", "hello", "holds an old version")]


def test_busy_instances_never_recycled() -> None:
    hb = _hb(
        _inst("b1", state="busy", idle_ms=10**9),
        _inst("b2", state="busy", fn="gone", idle_ms=10**9),
        _inst("b3", state="busy", ver="old", idle_ms=10**9),
    )
    assert keepalive_expired(hb, {"hello": _spec(idle_s=1.0)}, PoolPolicy()) == []


def test_generic_and_transitional_instances_never_recycled() -> None:
    hb = _hb(
        _inst("g", state="generic", fn=None, ver=None, idle_ms=10**9),
        _inst("s", state="starting", fn=None, ver=None, idle_ms=10**9),
        _inst("sp", state="specializing", idle_ms=10**9),
        _inst("r", state="recycling", idle_ms=10**9),
    )
    assert keepalive_expired(hb, {"hello": _spec(idle_s=1.0)}, PoolPolicy()) == []


def test_nothing_to_do() -> None:
    assert keepalive_expired(_hb(), {}, PoolPolicy()) == []


def test_instances_of_a_version_being_prewarmed_are_not_stale() -> None:
    from events import InstanceSummary, NodeHeartbeat

    hb = NodeHeartbeat(
        node="n",
        incarnation="i",
        instances=[
            InstanceSummary(instance="new", state="ready", function="hello", function_version="v2"),
            InstanceSummary(instance="old", state="ready", function="hello", function_version="v0"),
        ],
    )
    spec = _spec()
    assert spec.code_version not in ("v2", "v0")
    recycled = keepalive_expired(hb, {"hello": spec}, PoolPolicy(), protected={("hello", "v2")})
    assert [d.instance for d in recycled] == ["old"]
