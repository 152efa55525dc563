"""The benchmark programs' pure parts: percentiles, open-loop schedules and verdicts, trace
parsing and sampling, the report's targets. No broker: `tests/e2e/test_bench_scenarios.py` runs
the programs themselves."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest

from loadtest import load, replay, report, throughput
from loadtest.load import Breaking, Outcome, Sample
from loadtest.stats import latency_summary, ratio

DATA = Path(__file__).resolve().parents[2] / "loadtest" / "data" / "azure-functions-2019-sample"


def test_latency_summary_has_the_tail_percentiles() -> None:
    s = latency_summary([float(x) for x in range(2000, 0, -1)])
    assert (s["n"], s["min"], s["p50"], s["p99"], s["max"]) == (2000, 1, 1000, 1980, 2000)
    assert s["p99.9"] in (1998, 1999)  # nearest rank, give or take the float in 99.9 / 100 * n
    assert latency_summary([]) == {"n": 0}
    assert ratio(3.0, 2.0) == 1.5 and ratio(None, 2.0) is None and ratio(1.0, 0.0) is None


def test_schedule_is_evenly_spaced_at_the_rate() -> None:
    due = load.schedule(100, 2)
    assert len(due) == 200 and due[0] == 0 and due[1] == pytest.approx(0.01) and due[-1] < 2


def test_server_timing_header_is_parsed() -> None:
    assert load.server_timing("queue;dur=0.4, start;dur=0, exec;dur=0.2, total;dur=2.1") == {
        "queue": 0.4,
        "start": 0.0,
        "exec": 0.2,
        "total": 2.1,
    }
    assert load.server_timing(None) is None


def _samples(rate: float, seconds: float, latency_ms: float, status: str = "ok") -> list[Sample]:
    return [Sample(t, t, latency_ms, Outcome(status, "warm")) for t in load.schedule(rate, seconds)]


def test_a_step_holds_or_breaks_on_latency_errors_and_missing_answers() -> None:
    rule = Breaking(max_error_share=0.01, p99_limit_ms=100)
    held = load.judge_step(_samples(50, 2, 5.0), 50, 2, rule)
    assert not held["broken"] and held["achieved_per_s"] == 50
    slow = load.judge_step(_samples(50, 2, 500.0), 50, 2, rule)
    assert slow["broken"] and "p99" in slow["why"]
    errors = _samples(50, 2, 5.0)[:90] + _samples(50, 2, 5.0, "rejected")[90:]
    assert load.judge_step(errors, 50, 2, rule)["broken"]
    missing = _samples(50, 2, 5.0)[:80]
    assert "errors" in load.judge_step(missing, 50, 2, rule)["why"]


def test_rates_step_up_until_one_breaks_then_refine_once() -> None:
    rates = [50.0, 100.0, 200.0]
    steps: list[dict[str, object]] = []
    assert throughput.next_rates(rates, steps, refine=True) == 50
    steps.append({"offered_per_s": 50.0, "broken": False, "achieved_per_s": 50.0})
    assert throughput.next_rates(rates, steps, refine=True) == 100
    steps.append({"offered_per_s": 100.0, "broken": True, "achieved_per_s": 70.0})
    assert throughput.next_rates(rates, steps, refine=True) == 75
    steps.append({"offered_per_s": 75.0, "broken": False, "achieved_per_s": 75.0})
    assert throughput.next_rates(rates, steps, refine=True) is None
    assert throughput.sustained(steps) == 75  # type: ignore[arg-type]


def test_trace_window_is_parsed_by_header_name(tmp_path: Path) -> None:
    # Columns in another order than the sample's: only the header names count.
    (tmp_path / "1_inv.csv").write_text("minute_2,HashOwner,minute_1,HashFunction,HashApp\n3,o,0,f1,a\n")
    (tmp_path / "1_run.csv").write_text(
        "HashFunction,Average,percentile_Average_100,percentile_Average_0,percentile_Average_1,"
        "percentile_Average_25,percentile_Average_50,percentile_Average_75,percentile_Average_99\n"
        "f1,20,100,1,2,10,20,30,90\n"
    )
    [f] = replay.load_window(tmp_path, 1, 1, 2)
    assert f.counts == [0, 3] and f.exec_percentiles_ms[0] == 1 and f.exec_percentiles_ms[100] == 100


def test_execution_times_follow_the_percentiles() -> None:
    pct = {0: 1.0, 1: 2.0, 25: 10.0, 50: 20.0, 75: 30.0, 99: 90.0, 100: 100.0}
    assert replay.draw_exec_ms(pct, 0.0) == 1.0
    assert replay.draw_exec_ms(pct, 0.5) == 20.0
    assert replay.draw_exec_ms(pct, 0.625) == pytest.approx(25.0)
    assert replay.draw_exec_ms(pct, 1.0) == 100.0


def test_the_plan_spreads_each_minute_and_compresses_time() -> None:
    assert DATA.is_dir(), f"the trace sample is missing from the repository ({DATA})"
    window = replay.load_window(DATA, 100, 1, 10)
    picked = replay.pick(window, 5, 60, random.Random(1))
    assert 0 < len(picked) <= 5 and all(sum(f.counts) > 0 and max(f.counts) <= 60 for f in picked)
    assert picked == replay.pick(window, 5, 60, random.Random(1))  # the seed decides
    planned = replay.plan(picked, 60.0, random.Random(2), max_exec_ms=50)
    assert len(planned) == sum(sum(f.counts) for f in picked)
    assert all(0 <= p.due_s < 10 and 0 <= p.exec_ms <= 50 for p in planned)  # 10 trace minutes in 10 s
    assert [p.due_s for p in planned] == sorted(p.due_s for p in planned)
    for index, f in enumerate(picked):
        for minute, count in enumerate(f.counts):
            assert sum(1 for p in planned if p.function == index and int(p.due_s) == minute) == count


def test_held_instances_sum_heartbeats_times_interval() -> None:
    from events import NodeHeartbeat
    from events.node import InstanceSummary

    held = replay.HeldInstances({"f"})

    def beat(at: int, node: str, states: list[tuple[str, str | None]]) -> NodeHeartbeat:
        return NodeHeartbeat(
            node=node,
            incarnation="i",
            at_ms=at,
            interval_ms=500,
            instances=[InstanceSummary(instance=str(n), state=s, function=fn) for n, (s, fn) in enumerate(states)],
        )

    held.on_record(beat(1000, "a", [("ready", "f"), ("busy", "f"), ("generic", None), ("ready", "other")]))
    held.on_record(beat(1500, "a", [("ready", "f")]))
    held.on_record(beat(1200, "b", [("specializing", "f")]))
    assert held.instance_seconds(0, 10_000) == pytest.approx((2 + 1 + 1) * 0.5)
    assert held.instance_seconds(1100, 10_000) == pytest.approx(1.0)
    assert held.per_second(0, 3) == [0.0, 2.0, 2.0]


def _write(results: Path, name: str, data: dict[str, object]) -> None:
    (results / name).write_bytes(orjson.dumps(data))


def test_report_puts_the_targets_next_to_the_latest_figures(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "warm-1.json",
        {
            "scenario": "warm",
            "comparison": {"kafka_sequential": {"p50_ratio": 1.5, "p99_ratio": 3.3}},
            "direct": {},
            "stoker": {"kafka": {}, "http": {}},
        },
    )
    _write(tmp_path, "throughput-1.json", {"scenario": "throughput", "stoker_over_direct": 0.25})
    _write(tmp_path, "cold-1.json", {"scenario": "cold", "comparison": {"light": {"paired_difference_p50_ms": 0.4}}})
    _write(
        tmp_path,
        "trace-1.json",
        {
            "scenario": "trace",
            "runs": {
                "fixed": {"cold_starts": 10, "instance_seconds_held": 100.0},
                "hybrid": {"cold_starts": 8, "instance_seconds_held": 90.0},
            },
        },
    )
    found = {name: hit for name in report.SCENARIOS if (hit := report.latest(tmp_path, name))}
    verdicts = {v.target.split(" ")[0] + v.target.split(" ")[1]: v for v in report.verdicts(found)}
    assert [v.met for v in report.verdicts(found)] == [True, False, False, True, True]
    assert "missed by 10%" in verdicts["warmp99"].margin
    assert "25% under" in verdicts["warmp50"].margin
    text = report.render(found, tmp_path, tmp_path / "REPORT.md")
    assert "| warm p50 <= 2x" in text and "MISSED" in text and "`python -m loadtest floor`" in text


def test_report_without_results_says_what_is_missing(tmp_path: Path) -> None:
    assert report.main(["--results", str(tmp_path)]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert "not measured" in text and "`python -m loadtest trace`" in text
