"""Unit tests of services.poolmgr.keepalive: the idle-time histogram and the fixed and hybrid policies."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from services.poolmgr.keepalive import (
    DEFAULT_RANGE_S,
    FixedPolicy,
    HybridPolicy,
    IdleHistogram,
    KeepAliveDecision,
    forecast_idle_s,
    policy_from_config,
)

MIN = 60.0
HOUR = 3600.0


def _hist_of(idle_times: list[float], **kw: float) -> IdleHistogram:
    hist = IdleHistogram(**kw)
    for idle in idle_times:
        hist.record_idle(idle)
    return hist


def _periodic(every_s: float, n: int, duration_s: float = 0.0) -> IdleHistogram:
    hist = IdleHistogram()
    for i in range(n):
        hist.record_arrival(i * every_s, duration_s)
    return hist


# --- the histogram ------------------------------------------------------------------------------


def test_idle_times_fall_into_one_minute_bins_up_to_four_hours() -> None:
    hist = _hist_of([0.0, 59.9, 60.0, 61.0, 14_399.0, 14_400.0, 50_000.0])
    assert len(hist.bins) == 240 and hist.range_s == DEFAULT_RANGE_S
    assert hist.bins[0] == 2 and hist.bins[1] == 2 and hist.bins[239] == 1
    assert hist.count == 5 and hist.out_of_bounds == 2 and hist.total == 7
    assert hist.out_of_bounds_share == pytest.approx(2 / 7)


def test_histogram_shape_is_validated_and_idle_times_are_not_negative() -> None:
    assert len(IdleHistogram(range_s=600, bin_s=30).bins) == 20
    with pytest.raises(ValueError):
        IdleHistogram(range_s=100, bin_s=60)  # not a whole number of bins
    with pytest.raises(ValueError):
        IdleHistogram(range_s=60, bin_s=0)
    with pytest.raises(ValueError):
        IdleHistogram().record_idle(-1.0)


def test_record_arrival_measures_idle_time_from_the_end_of_the_previous_invocation() -> None:
    hist = IdleHistogram()
    assert hist.record_arrival(100.0, duration_s=30.0) is None  # nothing before the first
    assert hist.record_arrival(400.0, duration_s=30.0) == pytest.approx(270.0)  # 400 - (100 + 30)
    # Overlapping invocations: idle 0, and the busy period ends with the later-ending one.
    assert hist.record_arrival(410.0, duration_s=100.0) == 0.0
    assert hist.record_arrival(420.0, duration_s=1.0) == 0.0
    assert hist.record_arrival(600.0) == pytest.approx(90.0)  # 600 - (410 + 100)
    assert hist.record_arrival(550.0) == 0.0  # out of order: never negative
    assert hist.count == 5 and hist.bins[0] == 3 and hist.bins[1] == 1 and hist.bins[4] == 1


def test_percentiles_are_nearest_rank_over_the_binned_idle_times() -> None:
    # One idle time in each of the bins 0..99, plus out-of-bounds ones that are not ranked.
    hist = _hist_of([i * MIN + 1 for i in range(100)] + [5 * HOUR] * 30)
    assert hist.percentile_bins(5, 50, 99, 100) == [4, 49, 98, 99]
    assert hist.percentile_bins(0) == [0]
    assert hist.head_s(5) == 4 * MIN  # lower edge of the head bin
    assert hist.tail_s(99) == 99 * MIN  # upper edge of the tail bin


def test_percentiles_skip_empty_bins() -> None:
    hist = _hist_of([10 * MIN + 5] * 19 + [30 * MIN])
    assert hist.percentile_bins(0, 5, 95, 99) == [10, 10, 10, 30]
    with pytest.raises(ValueError):
        IdleHistogram().percentile_bins(50)
    with pytest.raises(ValueError):
        hist.percentile_bins(101)


def test_cv_of_bin_counts() -> None:
    assert IdleHistogram().cv == 0.0
    spike = _hist_of([30 * MIN] * 50)
    assert spike.cv == pytest.approx(math.sqrt(239))  # one bar out of 240: the most predictable
    flat = _hist_of([i * MIN for i in range(240)] * 3)
    assert flat.cv == pytest.approx(0.0, abs=1e-9)  # every bin alike: nothing to predict
    # The incremental CV agrees with the direct one on arbitrary data.
    rng = random.Random(7)
    hist = _hist_of([rng.expovariate(1 / (20 * MIN)) for _ in range(500)])
    direct = statistics.pstdev(hist.bins) / statistics.fmean(hist.bins)
    assert hist.cv == pytest.approx(direct)


def test_representativeness_checks_samples_then_out_of_bounds_then_cv() -> None:
    assert "too few" in (_hist_of([30 * MIN] * 4).unrepresentative_reason(5, 0.5, 2.0) or "")
    assert _hist_of([30 * MIN] * 5).unrepresentative_reason(5, 0.5, 2.0) is None
    oob = _hist_of([30 * MIN] * 5 + [5 * HOUR] * 5)
    assert "out of bounds" in (oob.unrepresentative_reason(5, 0.5, 2.0) or "")
    assert oob.unrepresentative_reason(5, 0.6, 2.0) is None
    flat = _hist_of([i * MIN for i in range(240)])
    assert "no pattern" in (flat.unrepresentative_reason(5, 0.5, 2.0) or "")


# --- decisions ----------------------------------------------------------------------------------


def test_decision_windows() -> None:
    keep = KeepAliveDecision(0.0, 600.0, "r")
    assert keep.wants_loaded(0.0) and keep.wants_loaded(600.0) and not keep.wants_loaded(600.1)
    assert keep.unload_after_s == 600.0
    prewarm = KeepAliveDecision(1000.0, 300.0, "r")
    assert not prewarm.wants_loaded(0.0) and not prewarm.wants_loaded(999.0)
    assert prewarm.wants_loaded(1000.0) and prewarm.wants_loaded(1300.0) and not prewarm.wants_loaded(1301.0)
    assert prewarm.unload_after_s == 1300.0


def test_fixed_policy_ignores_the_histogram() -> None:
    policy = FixedPolicy(600.0)
    for hist in (IdleHistogram(), _periodic(30 * MIN, 50), _hist_of([5 * HOUR] * 10)):
        d = policy.decide(hist)
        assert (d.prewarm_after_s, d.keep_alive_s) == (0.0, 600.0)
        assert "fixed" in d.reason
    assert policy.name == "fixed"
    with pytest.raises(ValueError):
        FixedPolicy(-1.0)


def test_hybrid_periodic_function_is_prewarmed_shortly_before_the_period() -> None:
    hist = _periodic(30 * MIN, 20)  # 19 idle times of exactly 30 minutes
    d = HybridPolicy().decide(hist)
    assert d.reason.startswith("histogram")
    # Head and tail both in the 30-minute bin: pre-warm at 30 min - 10%, unload at 31 min + 5%.
    assert d.prewarm_after_s == pytest.approx(27 * MIN)
    assert d.unload_after_s == pytest.approx(31 * MIN * 1.05)
    assert d.keep_alive_s == pytest.approx(31 * MIN * 1.05 - 27 * MIN)  # about 5.5 minutes, not 4 hours
    assert not d.wants_loaded(1 * MIN)  # unloaded right after the invocation
    assert d.wants_loaded(30 * MIN)  # loaded when the next one comes


def test_hybrid_periodic_function_with_execution_time_learns_the_idle_time() -> None:
    hist = _periodic(30 * MIN, 20, duration_s=90.0)  # idle 28.5 minutes each time
    d = HybridPolicy().decide(hist)
    assert d.prewarm_after_s == pytest.approx(28 * MIN * 0.9)
    assert d.unload_after_s == pytest.approx(29 * MIN * 1.05)
    assert d.wants_loaded(28.5 * MIN)


def _bursty() -> IdleHistogram:
    # Bursts of 10 invocations a second apart, every 2 hours: 90% of idle times ~0, 10% ~2 hours.
    hist = IdleHistogram()
    for burst in range(6):
        for i in range(10):
            hist.record_arrival(burst * 2 * HOUR + i)
    return hist


def test_paper_window_keeps_a_bursty_function_loaded_through_its_quiet_periods() -> None:
    d = HybridPolicy(cold_start_cost_s=None, tail_pct=99.0, tail_margin=None).decide(_bursty())
    assert d.reason.startswith("histogram")
    assert d.prewarm_after_s == 0.0  # the head is in the first bin: never unload after an invocation
    assert d.wants_loaded(1.0)
    assert d.wants_loaded(2 * HOUR - 9)  # the tail is the quiet period, so the next burst is warm
    assert d.keep_alive_s == pytest.approx(120 * MIN * 1.1)


def test_a_window_costing_more_idle_per_cold_start_avoided_than_a_cold_start_is_worth_is_not_taken() -> None:
    # Two idle hours per quiet period to avoid one cold start: above the 45 minutes one is worth.
    d = HybridPolicy().decide(_bursty())
    assert (d.prewarm_after_s, d.keep_alive_s) == (0.0, 600.0)
    assert d.reason.startswith("fallback: the standard keep-alive costs least (p5 0s, p100 7200s")
    # Worth it when a cold start is priced above those two hours.
    dear = HybridPolicy(cold_start_cost_s=3 * HOUR).decide(_bursty())
    assert dear.keep_alive_s == pytest.approx(120 * MIN * 1.05) and "p5-p100" in dear.reason


def test_cost_of_a_window_counts_idle_seconds_and_priced_cold_starts() -> None:
    policy = HybridPolicy(cold_start_cost_s=100.0)
    hist = _hist_of([30.0, 30.0, 20 * MIN + 30, 5 * HOUR])  # bins 0, 0, 20 and one out of bounds
    seen = [(i, c) for i, c in enumerate(hist.bins) if c]
    # Window 0-600s: two warm (30 s idle each), bin 20 cold (600 s idle + 100), out of bounds likewise.
    assert policy._cost(seen, hist.out_of_bounds, 0.0, 600.0) == pytest.approx(2 * 30 + 2 * (600 + 100))
    # Window 1000-1500s: bins 0 cold before the pre-warm (100 each), bin 20 warm (1230 - 1000 idle).
    assert policy._cost(seen, hist.out_of_bounds, 1000.0, 1500.0) == pytest.approx(2 * 100 + 230 + 500 + 100)


def test_hybrid_frequent_function_keeps_at_least_the_standard_keep_alive() -> None:
    rng = random.Random(3)
    hist = IdleHistogram()
    t = 0.0
    for _ in range(2000):
        t += rng.uniform(0.0, 20.0)
        hist.record_arrival(t, 0.1)
    d = HybridPolicy().decide(hist)
    assert d.prewarm_after_s == 0.0 and d.reason.startswith("histogram")
    assert d.keep_alive_s == 600.0  # every idle time in the first bin; the window is not shorter
    paper = HybridPolicy(floor_no_prewarm=False, cold_start_cost_s=None, tail_pct=99.0, tail_margin=None).decide(hist)
    assert paper.keep_alive_s == pytest.approx(MIN * 1.1)


def test_out_of_bounds_idle_times_are_forecast() -> None:
    hist = _periodic(5 * HOUR, 10)
    assert hist.out_of_bounds == 9 and hist.count == 0
    assert list(hist.recent_out_of_bounds) == [5 * HOUR] * 8  # the latest 8
    d = HybridPolicy().decide(hist)
    assert d.reason.startswith("forecast (median of 8 idle times beyond the range: 18000s")
    # Unloaded after use, pre-warmed at the forecast - 15%, kept until + 15%.
    assert d.prewarm_after_s == pytest.approx(5 * HOUR * 0.85)
    assert d.unload_after_s == pytest.approx(5 * HOUR * 1.15)
    assert d.wants_loaded(5 * HOUR) and not d.wants_loaded(HOUR)
    without = HybridPolicy(forecast=None).decide(hist)
    assert "out of bounds" in without.reason and (without.prewarm_after_s, without.keep_alive_s) == (0.0, 600.0)


def test_forecasts_of_the_next_idle_time() -> None:
    recent = [5 * HOUR, 7 * HOUR, 6 * HOUR, 20 * HOUR]
    assert forecast_idle_s(recent, "median") == pytest.approx(6.5 * HOUR)  # one outlier does not move it
    assert forecast_idle_s(recent, "last") == 20 * HOUR
    # Exponential smoothing, alpha 0.5: 5 -> 6 -> 6 -> 13 hours.
    assert forecast_idle_s(recent, "ses") == pytest.approx(13 * HOUR)
    with pytest.raises(ValueError):
        forecast_idle_s([], "median")
    with pytest.raises(ValueError):
        forecast_idle_s(recent, "arima")
    with pytest.raises(ValueError):
        HybridPolicy(forecast="arima")


def test_scaled_policy_decides_the_same_on_a_faster_clock() -> None:
    fast = HybridPolicy().scaled(60.0)
    assert (fast.range_s, fast.bin_s, fast.fallback_keep_alive_s) == (240.0, 1.0, 10.0)
    slow_hist, fast_hist = HybridPolicy().new_histogram(), fast.new_histogram()
    for i in range(20):
        slow_hist.record_arrival(i * 30 * MIN)
        fast_hist.record_arrival(i * 30.0)
    slow, quick = HybridPolicy().decide(slow_hist), fast.decide(fast_hist)
    assert quick.prewarm_after_s == pytest.approx(slow.prewarm_after_s / 60)
    assert quick.unload_after_s == pytest.approx(slow.unload_after_s / 60)
    with pytest.raises(ValueError):
        HybridPolicy().scaled(0.0)


def test_hybrid_some_out_of_bounds_idle_times_still_use_the_histogram() -> None:
    hist = _hist_of([30 * MIN] * 12 + [6 * HOUR] * 8)  # 40% out of bounds < 50%
    d = HybridPolicy().decide(hist)
    assert d.reason.startswith("histogram")
    assert d.prewarm_after_s == pytest.approx(27 * MIN)


def test_hybrid_falls_back_until_enough_idle_times_and_without_a_pattern() -> None:
    policy = HybridPolicy(min_samples=5, fallback_keep_alive_s=2 * HOUR)
    hist = IdleHistogram()
    reasons = []
    for i in range(7):
        hist.record_arrival(i * 20 * MIN)
        reasons.append(policy.decide(hist).reason)
    # 0..4 idle times recorded after arrivals 1..5: the fallback; 5 and 6: the histogram.
    assert [r.split(" (")[0] for r in reasons] == ["fallback: too few idle times"] * 5 + ["histogram"] * 2
    flat = _hist_of([i * MIN + 30 for i in range(240)])  # idle times spread evenly over 4 hours
    d = policy.decide(flat)
    assert "no pattern" in d.reason
    assert (d.prewarm_after_s, d.keep_alive_s) == (0.0, 2 * HOUR)


def test_hybrid_policy_is_validated() -> None:
    for bad in (
        {"head_pct": 50.0, "tail_pct": 10.0},
        {"tail_pct": 101.0},
        {"margin": 1.0},
        {"margin": -0.1},
        {"min_samples": 0},
        {"range_s": 100.0},
    ):
        with pytest.raises(ValueError):
            HybridPolicy(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="new_histogram"):
        HybridPolicy().decide(IdleHistogram(range_s=HOUR))
    assert len(HybridPolicy(range_s=HOUR).new_histogram().bins) == 60


def test_policy_from_config() -> None:
    fixed = policy_from_config("fixed", 120.0)
    assert isinstance(fixed, FixedPolicy) and fixed.keep_alive_s == 120.0 and fixed.name == "fixed"
    hybrid = policy_from_config(" Hybrid ", 120.0)
    assert hybrid == HybridPolicy() and hybrid.name == "hybrid"
    assert policy_from_config("hybrid", 120.0, time_scale=60.0) == HybridPolicy().scaled(60.0)
    with pytest.raises(ValueError, match="unknown keep-alive policy"):
        policy_from_config("lru", 120.0)


def test_the_forecast_may_decide_before_the_histogram_has_enough_idle_times() -> None:
    hist = _hist_of([7 * HOUR, 7 * HOUR])  # two idle times, both beyond the range
    assert HybridPolicy().decide(hist).reason.startswith("fallback: too few idle times")
    early = HybridPolicy(forecast_min_samples=2).decide(hist)
    assert early.reason.startswith("forecast") and early.prewarm_after_s == pytest.approx(7 * HOUR * 0.85)


def test_the_unload_margin_is_its_own_and_defaults_to_the_head_margin() -> None:
    hist = _periodic(30 * MIN, 20)
    own = HybridPolicy(margin=0.10, tail_margin=0.20).decide(hist)
    assert own.prewarm_after_s == pytest.approx(27 * MIN) and own.unload_after_s == pytest.approx(31 * MIN * 1.2)
    shared = HybridPolicy(margin=0.10, tail_margin=None).decide(hist)
    assert shared.unload_after_s == pytest.approx(31 * MIN * 1.1)
    with pytest.raises(ValueError):
        HybridPolicy(tail_margin=1.0)
