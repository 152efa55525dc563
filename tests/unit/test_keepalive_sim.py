"""The keep-alive simulator (loadtest.keepalive_sim): known answers on synthetic traces, a slow reference,
and small runs of the program on the real Azure Functions sample."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import orjson
import pytest

from loadtest.keepalive_sim import DEFAULT_DATA, arrivals, load_sample, main, simulate
from services.poolmgr.keepalive import FixedPolicy, HybridPolicy, KeepAliveDecision, KeepAlivePolicy

MIN = 60.0
DAY = 86_400.0


def test_every_20_minutes_fixed_10_is_always_cold_and_hybrid_learns_to_prewarm() -> None:
    times = [i * 20 * MIN for i in range(72)]  # exactly every 20 minutes for a day, instant runs
    fixed = simulate(times, 0.0, FixedPolicy(10 * MIN), DAY)
    assert fixed.invocations == 72 and fixed.cold_starts == 72
    assert fixed.idle_s == pytest.approx(72 * 10 * MIN)  # 10 idle minutes after every invocation

    hybrid = simulate(times, 0.0, HybridPolicy(min_samples=5), DAY)
    assert hybrid.cold_starts == 6  # the first, and the 5 learnt under the standard keep-alive
    # Learning: the first 5 gaps under the 10-minute standard keep-alive (cold, 10 idle minutes
    # each). Then the histogram: pre-warm at 18 min (20 min - 10%), 2 idle minutes per gap, also
    # after the last.
    assert hybrid.idle_s == pytest.approx(5 * 10 * MIN + 66 * 2 * MIN + 2 * MIN)
    assert hybrid.final_reason.startswith("histogram")


def test_execution_time_counts_as_busy_not_idle() -> None:
    times = [i * 20 * MIN for i in range(72)]
    fixed = simulate(times, 30.0, FixedPolicy(10 * MIN), DAY)
    assert fixed.cold_starts == 72 and fixed.idle_s == pytest.approx(72 * 10 * MIN)
    hybrid = simulate(times, 30.0, HybridPolicy(min_samples=5), DAY)
    # Idle times of 19.5 minutes: bin 19, pre-warm at 17.1 min, so 2.4 idle minutes per gap.
    assert hybrid.cold_starts == 6
    assert hybrid.idle_s == pytest.approx(5 * 10 * MIN + 67 * 2.4 * MIN)


def test_overlapping_invocations_share_the_instance() -> None:
    out = simulate([0.0, 10.0, 20.0], 100.0, FixedPolicy(60.0), 1000.0)
    assert out.cold_starts == 1 and out.idle_s == pytest.approx(60.0)  # busy 0..120, idle 120..180


def test_idle_time_is_cut_at_the_end_of_the_window_and_no_arrivals_cost_nothing() -> None:
    assert simulate([100.0], 0.0, FixedPolicy(600.0), 400.0).idle_s == pytest.approx(300.0)
    empty = simulate([], 1.0, FixedPolicy(600.0), DAY)
    assert (empty.invocations, empty.cold_starts, empty.idle_s) == (0, 0, 0.0)


def _loaded_seconds(d: KeepAliveDecision, gap_s: float) -> float:
    """Seconds of ``[0, gap_s]`` in which ``d`` wants the instance loaded, sampled every second."""
    whole = int(gap_s)
    return sum(1.0 for k in range(whole) if d.wants_loaded(k + 0.5)) + (gap_s - whole) * d.wants_loaded(gap_s)


def _reference(times: list[float], duration_s: float, policy: KeepAlivePolicy, end_s: float) -> tuple[int, float, int]:
    """Second by second: loaded whenever the decision wants it; cold when an arrival finds it unloaded.

    Also counts the arrivals that came before their pre-warm point (cold, the instance unloaded).
    """
    hist = policy.new_histogram()
    cold, idle, early = 0, 0.0, 0
    busy_until: float | None = None
    for t in times:
        if busy_until is None:
            cold += 1
        elif t > busy_until:
            d = policy.decide(hist)
            early += t - busy_until < d.prewarm_after_s
            idle += _loaded_seconds(d, t - busy_until)
            cold += not d.wants_loaded(t - busy_until)
        busy_until = t + duration_s if busy_until is None else max(busy_until, t + duration_s)
        hist.record_arrival(t, duration_s)
    assert busy_until is not None
    if end_s > busy_until:
        idle += _loaded_seconds(policy.decide(hist), end_s - busy_until)
    return cold, idle, early


@pytest.mark.parametrize("policy", [FixedPolicy(10 * MIN), HybridPolicy(), HybridPolicy(min_samples=2)])
def test_fast_simulation_matches_a_second_by_second_reference(policy: KeepAlivePolicy) -> None:
    # A mixed trace: a jittered 25-minute timer with one off-schedule call, a burst and a call just
    # past 10 idle minutes after it, a long quiet spell, the timer again.
    rng = random.Random(11)
    times = sorted(
        [i * 25 * MIN + rng.uniform(0, 90) for i in range(30)]
        + [20 * 25 * MIN + 6 * MIN]
        + [13 * 3600 + rng.uniform(0, 300) for _ in range(40)]
        + [13 * 3600 + 300 + 11 * MIN]
        + [18 * 3600 + i * 25 * MIN + rng.uniform(0, 90) for i in range(12)]
    )
    fast = simulate(times, 2.5, policy, DAY)
    cold, idle, early = _reference(times, 2.5, policy, DAY)
    assert fast.invocations == len(times)
    assert fast.cold_starts == cold
    assert fast.idle_s == pytest.approx(idle, abs=len(times) * 2.0)  # the reference steps whole seconds
    if isinstance(policy, HybridPolicy):
        assert early > 0  # the trace exercises the unloaded-before-the-pre-warm path


def test_arrivals_spread_each_minute_uniformly_and_reproducibly() -> None:
    counts = [0, 2, 0, 3]
    times = arrivals(counts, random.Random(5))
    assert len(times) == 5 and times == sorted(times)
    assert all(60 <= t < 120 for t in times[:2]) and all(180 <= t < 240 for t in times[2:])
    assert times == arrivals(counts, random.Random(5))


def _write_shuffled_sample(folder: Path, name: str, counts: list[int], average_ms: int) -> None:
    """A one-function sample in the file format, columns deliberately in another order than usual."""
    minutes = [f"minute_{m}" for m in range(1, len(counts) + 1)]
    with (folder / "100_inv.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["HashApp", *reversed(minutes), "HashOwner", "HashFunction"])
        w.writerow(["app", *reversed([str(c) for c in counts]), "owner", name])
    with (folder / "100_run.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Average", "HashFunction", "HashOwner", "HashApp", "Count"])
        w.writerow([str(average_ms), name, "owner", "app", "1"])


def test_program_on_a_synthetic_sample_file(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    _write_shuffled_sample(data, "every20", [1 if m % 20 == 0 else 0 for m in range(1440)], average_ms=500)
    assert main(["--sample", "100", "--data", str(data), "--out", str(out)]) == 0
    report = orjson.loads(next(out.glob("keepalive-*.json")).read_bytes())
    fixed, hybrid = report["policies"]["fixed 10 min"], report["policies"]["hybrid"]
    assert fixed["invocations"] == hybrid["invocations"] == 72
    assert fixed["cold_starts"] == 72 and fixed["cold_start_pct"] == 100.0
    # The first and 5 while learning; after that the jitter within each minute stays inside the window.
    assert hybrid["cold_starts"] == 6
    assert hybrid["idle_instance_s"] < fixed["idle_instance_s"] / 2
    assert report["hybrid_over_fixed"]["cold_starts"] == pytest.approx(6 / 72, abs=1e-4)
    assert report["target"]["groups_with_more_cold_starts"] == []
    # Every fixed keep-alive of the Pareto plot and the hybrid variants ran on the same arrivals.
    for minutes in (5, 10, 20, 30, 60, 120):
        assert report["policies"][f"fixed {minutes} min"]["invocations"] == 72
    assert report["policies"]["hybrid, no forecast"]["invocations"] == 72
    assert report["inputs"]["seed"] == 1 and report["inputs"]["functions"] == 1


@pytest.mark.parametrize("sample", [100, 1000])
def test_program_on_a_few_functions_of_the_real_sample(sample: int, tmp_path: Path) -> None:
    argv = ["--sample", str(sample), "--functions", "8", "--minutes", "240", "--seed", "3", "--out", str(tmp_path)]
    assert main(argv) == 0
    report = orjson.loads(next(tmp_path.glob("keepalive-*.json")).read_bytes())
    traces = load_sample(DEFAULT_DATA, sample, 8, 240)
    expected = sum(sum(t.counts) for t in traces)
    assert expected > 0
    for figures in report["policies"].values():
        assert figures["invocations"] == expected
        assert figures["functions_invoked"] <= figures["cold_starts"] <= expected  # each first one is cold
        assert 0 <= figures["per_function_cold_start_pct_p50"] <= figures["per_function_cold_start_pct_p75"] <= 100
        assert figures["idle_instance_s"] >= 0
    assert sum(row["total_invocations"] for row in report["by_invocations"]) == expected
    assert report["inputs"]["minutes"] == 240 and report["inputs"]["seed"] == 3
    assert set(report["runtime_s"]) >= {"load", "total", "arrivals"}
