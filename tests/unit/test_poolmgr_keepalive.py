"""Unit tests of the pool manager's keep-alive decisions: learning arrivals from results, recycling
idle instances (fixed, hybrid, a function's own ``idle_s``) and pre-warming ahead of expected arrivals."""

from __future__ import annotations

import pytest

from events import CodeSource, FunctionSpec, InstanceSummary, InvocationCompleted, NodeHeartbeat, Timings
from services.poolmgr.app import pool_policy_from_env
from services.poolmgr.keepalive import FixedPolicy, HybridPolicy
from services.poolmgr.policy import (
    ArrivalBook,
    FunctionArrivals,
    PoolPolicy,
    RecycleDecision,
    keepalive_decisions,
    keepalive_prewarms,
    loaded_functions,
)

DIGEST = "sha256:" + "34" * 32
MIN_MS = 60_000
T0 = 1_700_000_000_000  # an epoch in ms: the book works on real timestamps
HYBRID = PoolPolicy(keepalive=HybridPolicy())
FIXED = PoolPolicy(keepalive=FixedPolicy(600.0))


def _spec(name: str = "tick", idle_s: float | None = None, digest: str = DIGEST) -> FunctionSpec:
    return FunctionSpec(name=name, entrypoint="handler:main", source=CodeSource(digest=digest), idle_s=idle_s)


VER = _spec().code_version


def _inst(i: str, *, fn: str = "tick", idle_s: float = 0.0, uses: int = 1, state: str = "ready") -> InstanceSummary:
    return InstanceSummary(
        instance=i,
        state=state,  # type: ignore[arg-type]
        function=fn,
        function_version=VER,
        idle_ms=int(idle_s * 1000),
        uses=uses,
    )


def _hb(*instances: InstanceSummary, node: str = "n") -> NodeHeartbeat:
    return NodeHeartbeat(node=node, incarnation="i", instances=list(instances))


def _every_20_min(book: ArrivalBook, n: int = 7, function: str = "tick") -> int:
    """``n`` instant invocations 20 minutes apart; returns the end of the last one (ms)."""
    for k in range(n):
        t = T0 + k * 20 * MIN_MS
        book.record(function, t, t, f"{function}-{k}")
    return T0 + (n - 1) * 20 * MIN_MS


def _learned_every_20_min(policy: PoolPolicy = HYBRID) -> tuple[dict[str, FunctionArrivals], int]:
    book = ArrivalBook(policy.keepalive)
    last = _every_20_min(book)
    return dict(book.functions), last


# --- learning -------------------------------------------------------------------------------------


def test_arrival_book_dates_arrivals_from_results_and_learns_the_hybrid_window() -> None:
    book = ArrivalBook(HybridPolicy())
    for k in range(7):
        end = T0 + k * 20 * MIN_MS
        result = InvocationCompleted(
            id=f"r{k}", function="tick", status="ok", timings_ms=Timings(total=30_000.0), completed_ms=end
        )
        assert book.record_result(result)
    fn = book.functions["tick"]
    assert fn.invocations == 7 and fn.last_end_ms == T0 + 6 * 20 * MIN_MS
    # Idle times: 20 min minus the 30 s each invocation ran (from its arrival to its result).
    assert fn.hist.count == 6 and fn.hist.bins[19] == 6
    # p5 and p100 in bin 19: pre-warm at 19 min - 10%, unload at 20 min + 5%.
    assert fn.decision.prewarm_after_s == pytest.approx(19 * 60 * 0.9)
    assert fn.decision.unload_after_s == pytest.approx(20 * 60 * 1.05)
    assert fn.decision.reason.startswith("histogram")


def test_arrival_book_counts_a_result_delivered_twice_once() -> None:
    book = ArrivalBook(HybridPolicy(), remember_ids=2)
    assert book.record("f", T0, T0 + 10, "a")
    assert not book.record("f", T0, T0 + 10, "a")
    assert book.functions["f"].invocations == 1 and book.functions["f"].hist.total == 0
    assert book.record("f", T0 + MIN_MS, T0 + MIN_MS, "b")
    assert book.record("f", T0 + 2 * MIN_MS, T0 + 2 * MIN_MS, "c")  # "a" is forgotten now
    assert book.record("f", T0 + 3 * MIN_MS, T0 + 3 * MIN_MS, "a")
    assert book.functions["f"].invocations == 4


def test_arrival_book_takes_results_out_of_order_and_forgets_deleted_functions() -> None:
    book = ArrivalBook(HybridPolicy())
    book.record("f", T0 + 5_000, T0 + 6_000, "short")  # arrived later, finished first
    book.record("f", T0, T0 + 10_000, "long")
    fn = book.functions["f"]
    assert fn.last_end_ms == T0 + 10_000 and fn.hist.bins[0] == 1  # overlapping: idle 0
    book.record("g", T0, T0)
    book.forget(["f", "unknown"])
    assert list(book.functions) == ["g"]


def test_fixed_policy_learns_nothing_it_would_use() -> None:
    learned, _ = _learned_every_20_min(FIXED)
    assert learned["tick"].decision.prewarm_after_s == 0 and learned["tick"].decision.keep_alive_s == 600


# --- recycling ------------------------------------------------------------------------------------


def test_fixed_policy_recycles_after_its_duration_whatever_was_learned() -> None:
    learned, last = _learned_every_20_min(FIXED)
    hb = _hb(_inst("kept", idle_s=600), _inst("gone", idle_s=601))
    decisions = keepalive_decisions(hb, {"tick": _spec()}, FIXED, learned, now_ms=last + 601_000)
    assert decisions == [RecycleDecision("gone", "tick", "keep-alive (fixed): idle 601s, window 0-600s")]


def test_hybrid_before_learning_keeps_the_standard_keep_alive() -> None:
    hb = _hb(_inst("kept", idle_s=600), _inst("gone", idle_s=601))
    decisions = keepalive_decisions(hb, {"tick": _spec()}, HYBRID, {}, now_ms=T0)
    assert [d.instance for d in decisions] == ["gone"]
    assert decisions[0].reason == (
        "keep-alive (hybrid): idle 601s, window 0-600s [fallback: too few idle times (0 < 5)]"
    )


def test_hybrid_unloads_right_after_use_and_keeps_a_prewarmed_instance_in_the_window() -> None:
    learned, last = _learned_every_20_min()
    specs = {"tick": _spec()}
    # Just used: the next invocation is not expected for 18 minutes, so it goes now.
    just_used = keepalive_decisions(_hb(_inst("a", idle_s=0.5)), specs, HYBRID, learned, now_ms=last + 500)
    assert just_used == [
        RecycleDecision(
            "a",
            "tick",
            "keep-alive (hybrid): idle 0.5s, window 1080-1323s "
            "[histogram (p5 1200s, p100 1260s, CV 15.5; p5-p100: 150s per idle time)]",
        )
    ]
    # An instance used 19 minutes ago is within the window: kept.
    in_window = _hb(_inst("b", idle_s=19 * 60))
    assert keepalive_decisions(in_window, specs, HYBRID, learned, now_ms=last + 19 * MIN_MS) == []
    # Pre-warmed at 18 minutes (never used; the agent counts its idle time from its start).
    prewarmed = _hb(_inst("p", idle_s=3, uses=0))
    assert keepalive_decisions(prewarmed, specs, HYBRID, learned, now_ms=last + 1083_000) == []
    late = keepalive_decisions(prewarmed, specs, HYBRID, learned, now_ms=last + 1400_000)
    assert [d.instance for d in late] == ["p"]
    assert late[0].reason.startswith("keep-alive (hybrid): unused, idle 3s, function idle 1400s, window 1080-1323s")


def test_unused_instance_of_a_function_not_seen_yet_is_judged_by_its_own_idle_time() -> None:
    hb = _hb(_inst("kept", idle_s=600, uses=0), _inst("gone", idle_s=601, uses=0))
    decisions = keepalive_decisions(hb, {"tick": _spec()}, FIXED, {}, now_ms=T0)
    assert decisions == [RecycleDecision("gone", "tick", "keep-alive (fixed): unused, idle 601s, window 0-600s")]


def test_explicit_idle_s_overrides_the_platform_policy() -> None:
    learned, last = _learned_every_20_min()
    specs = {"tick": _spec(idle_s=30.0)}
    # The hybrid decision would unload at once; the function's own idle_s keeps it 30 s.
    assert keepalive_decisions(_hb(_inst("a", idle_s=30)), specs, HYBRID, learned, now_ms=last + 30_000) == []
    decisions = keepalive_decisions(_hb(_inst("a", idle_s=31)), specs, HYBRID, learned, now_ms=last + 31_000)
    assert decisions == [RecycleDecision("a", "tick", "keep-alive (idle_s=30): idle 31s, window 0-30s")]
    # Also under fixed, and long before its 600 s.
    assert keepalive_decisions(_hb(_inst("a", idle_s=31)), specs, FIXED, learned, now_ms=last)[0].reason.startswith(
        "keep-alive (idle_s=30)"
    )


def test_hybrid_never_recycles_busy_protected_or_generic_instances_but_always_stale_ones() -> None:
    learned, last = _learned_every_20_min()
    specs = {"tick": _spec()}
    hb = _hb(
        _inst("busy", state="busy"),
        _inst("specializing", state="specializing"),
        InstanceSummary(instance="generic", state="generic", idle_ms=10**9),
        _inst("deleted", fn="gone", idle_s=19 * 60),  # in the window, but the function is gone
        InstanceSummary(instance="old", state="ready", function="tick", function_version="0" * 12, idle_ms=0, uses=1),
        InstanceSummary(instance="new", state="ready", function="tick", function_version="9" * 12, idle_ms=0),
    )
    decisions = keepalive_decisions(hb, specs, HYBRID, learned, protected={("tick", "9" * 12)}, now_ms=last)
    assert decisions == [
        RecycleDecision("deleted", "gone", "function deleted"),
        RecycleDecision("old", "tick", "holds an old version"),
    ]


# --- pre-warming ----------------------------------------------------------------------------------


def test_prewarm_is_due_at_the_start_of_the_window_and_not_before() -> None:
    learned, last = _learned_every_20_min()
    specs = {"tick": _spec()}
    assert keepalive_prewarms(specs, learned, HYBRID, set(), {}, last + 1079_000) == []
    due = keepalive_prewarms(specs, learned, HYBRID, set(), {}, last + 1080_000)
    assert [(d.function, d.window) for d in due] == [("tick", last)]
    assert due[0].reason == (
        "keep-alive policy: expected arrival in 0-243s "
        "(hybrid: idle 1080s, window 1080-1323s; "
        "histogram (p5 1200s, p100 1260s, CV 15.5; p5-p100: 150s per idle time))"
    )
    # Past the window: the expected arrival did not come; nothing to load any more.
    assert keepalive_prewarms(specs, learned, HYBRID, set(), {}, last + 1387_000) == []


def test_prewarm_is_requested_once_per_window_and_not_when_loaded() -> None:
    book = ArrivalBook(HybridPolicy())
    last = _every_20_min(book)
    specs = {"tick": _spec()}
    assert keepalive_prewarms(specs, book.functions, HYBRID, {"tick"}, {}, last + 1100_000) == []
    requested: dict[str, int] = {}
    for second in range(1080, 1387):  # every tick of the window
        for d in keepalive_prewarms(specs, book.functions, HYBRID, set(), requested, last + second * 1000):
            assert d.function not in requested, f"second request at {second}s"
            requested[d.function] = d.window
    assert requested == {"tick": last}
    # The expected invocation came: a new window, a new request in it.
    nxt = last + 20 * MIN_MS
    book.record("tick", nxt, nxt, "next")
    assert keepalive_prewarms(specs, book.functions, HYBRID, set(), requested, nxt + 1100_000)[0].window == nxt


def test_no_prewarm_without_a_prewarm_point() -> None:
    learned, last = _learned_every_20_min()
    at = last + 1100_000
    assert keepalive_prewarms({"tick": _spec(idle_s=1200.0)}, learned, HYBRID, set(), {}, at) == []  # own idle_s
    assert keepalive_prewarms({}, learned, HYBRID, set(), {}, at) == []  # deleted
    fixed, last = _learned_every_20_min(FIXED)
    assert keepalive_prewarms({"tick": _spec()}, fixed, FIXED, set(), {}, last + 1100_000) == []
    # Hybrid, but not enough idle times yet: the fallback keeps instances loaded instead.
    book = ArrivalBook(HybridPolicy())
    last = _every_20_min(book, n=3)
    assert book.functions["tick"].decision.prewarm_after_s == 0
    assert keepalive_prewarms({"tick": _spec()}, book.functions, HYBRID, set(), {}, last + 1100_000) == []


def test_loaded_means_the_active_version_in_some_instance_that_holds_or_loads_code() -> None:
    specs = {"a": _spec("a"), "b": _spec("b"), "c": _spec("c"), "d": _spec("d")}
    nodes = [
        _hb(_inst("1", fn="a", state="busy"), _inst("2", fn="b", state="recycling")),
        _hb(
            _inst("3", fn="c", state="specializing"),
            InstanceSummary(instance="4", state="ready", function="d", function_version="0" * 12),
            node="m",
        ),
    ]
    assert loaded_functions(nodes, specs) == {"a", "c"}


# --- the loop the pool manager runs, on a simulated clock -----------------------------------------


def _simulate(policy: PoolPolicy, every_s: int, n: int) -> tuple[int, int, int]:
    """One function invoked ``n`` times every ``every_s`` (instantly); a tick each second recycles and
    pre-warms, until half a period after the last call. Returns (cold starts, recycles, pre-warm requests).
    """
    book = ArrivalBook(policy.keepalive)
    specs = {"tick": _spec()}
    loaded: dict[str, float] | None = None  # the one instance: its uses and when last used/started
    requested: dict[str, int] = {}
    cold = recycles = prewarms = 0
    end_s = n * every_s
    for now_s in range(0, end_s + every_s // 2):
        now = T0 + now_s * 1000
        if now_s % every_s == 0 and now_s < end_s:
            cold += loaded is None
            loaded = {"uses": (loaded or {"uses": 0})["uses"] + 1, "since": now_s}
            book.record("tick", now, now, str(now_s))
        if loaded is not None:
            inst = _inst("x", idle_s=now_s - loaded["since"], uses=int(loaded["uses"]))
            if keepalive_decisions(_hb(inst), specs, policy, book.functions, now_ms=now):
                recycles += 1
                loaded = None
        holding = {"tick"} if loaded is not None else set()
        for d in keepalive_prewarms(specs, book.functions, policy, holding, requested, now):
            requested[d.function] = d.window
            prewarms += 1
            loaded = {"uses": 0, "since": now_s}
    return cold, recycles, prewarms


def test_every_20_minutes_hybrid_prewarms_each_call_and_fixed_10_minutes_is_always_cold() -> None:
    assert _simulate(FIXED, 20 * 60, 12) == (12, 12, 0)
    cold, recycles, prewarms = _simulate(HYBRID, 20 * 60, 12)
    # The first call is cold, and so are the next five under the 10-minute standard keep-alive; from
    # the sixth on (five idle times learned) each call is unloaded right after it ends and pre-warmed
    # at 18 minutes, in time for the next: 7 pre-warms (the last one for a call that never comes).
    assert (cold, prewarms) == (6, 7)
    # 10 minutes after each of the 6 learnt calls, right after each of the last 6, and the last
    # pre-warm once its window passed.
    assert recycles == 6 + 6 + 1


# --- configuration --------------------------------------------------------------------------------


def test_pool_policy_from_env() -> None:
    default = pool_policy_from_env({})
    assert default.generic_per_node == 2 and isinstance(default.keepalive, HybridPolicy)
    fixed = pool_policy_from_env(
        {"STOKER_KEEPALIVE": "fixed", "STOKER_KEEPALIVE_FIXED_S": "90", "STOKER_POOL_SIZE": "3"}
    )
    assert fixed == PoolPolicy(generic_per_node=3, keepalive=FixedPolicy(90.0))
    assert pool_policy_from_env({"STOKER_KEEPALIVE": "fixed"}).keepalive == FixedPolicy(600.0)
    assert isinstance(pool_policy_from_env({"STOKER_KEEPALIVE": " Hybrid "}).keepalive, HybridPolicy)
    with pytest.raises(ValueError, match="keep-alive policy"):
        pool_policy_from_env({"STOKER_KEEPALIVE": "lru"})
    with pytest.raises(ValueError, match="STOKER_KEEPALIVE_FIXED_S"):
        pool_policy_from_env({"STOKER_KEEPALIVE": "fixed", "STOKER_KEEPALIVE_FIXED_S": "ten"})
