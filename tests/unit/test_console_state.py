"""What the console shows, computed from hand-made records: figures, the stream, the cluster, runs, traces."""

from __future__ import annotations

from events import (
    ErrorInfo,
    InstanceSummary,
    InvocationCompleted,
    NodeHeartbeat,
    NodeMetrics,
    NodeStopped,
    PlacementOverride,
    Taint,
    ThrottleDecided,
    Timings,
)
from events.code import BuildFinished, BuildStarted
from events.workflow import RunFinished, RunStarted, StepFinished, StepSpec, StepStarted, WorkflowSpec
from services.console import state

NOW = 1_800_000_000_000


def result(
    ident: str, at_ms: int, *, fn: str = "f", status: str = "ok", start: str = "warm", total: float = 10.0
) -> InvocationCompleted:
    return InvocationCompleted(
        id=ident,
        function=fn,
        status=status,  # type: ignore[arg-type]
        start=start,  # type: ignore[arg-type]
        timings_ms=Timings(total=total),
        completed_ms=at_ms,
        error=ErrorInfo(kind="boom", message="x") if status != "ok" else None,
    )


def test_figures_cover_the_last_minute_and_chart_the_last_five() -> None:
    log = state.InvocationLog()
    for i in range(100):  # 100 results in the last minute: totals 1..100 ms, every 10th an error
        log.add(result(f"a{i}", NOW - 59_000 + i * 500, total=float(i + 1), status="error" if i % 10 == 0 else "ok"))
    log.add(result("old", NOW - 4 * 60_000, total=1000.0, start="spawn"))  # charted, not in the minute's figures
    figures = log.figures("f", NOW)
    assert figures["count"] == 100
    assert figures["per_s"] == round(100 / 60, 3)
    assert figures["p50_ms"] == 50.0 and figures["p99_ms"] == 99.0
    assert figures["error_rate"] == 0.1
    assert figures["start_share"] == {"warm": 1.0}
    series = figures["series"]
    assert sum(round(p["per_s"] * 10) for p in series) == 101
    assert sum(p["cold"] for p in series) == 1  # the spawn start, four minutes ago
    assert all(series[i]["at_ms"] < series[i + 1]["at_ms"] for i in range(len(series) - 1))
    assert log.figures("nobody", NOW)["p99_ms"] is None


def test_start_share_counts_each_kind() -> None:
    log = state.InvocationLog()
    for i, kind in enumerate(["warm", "warm", "prewarmed", "pool"]):
        log.add(result(f"s{i}", NOW - 1000 + i, start=kind))
    assert log.figures("f", NOW)["start_share"] == {"pool": 0.25, "prewarmed": 0.25, "warm": 0.5}


def test_results_from_interleaved_partitions_are_kept_in_time_order() -> None:
    log = state.InvocationLog()
    log.add(result("late", NOW - 1000))
    log.add(result("early", NOW - 5000))
    assert [s.at_ms for s in log.samples["f"]] == [NOW - 5000, NOW - 1000]


def test_old_samples_are_forgotten_and_the_stream_is_bounded() -> None:
    log = state.InvocationLog()
    log.add(result("ancient", NOW - state.STATS_WINDOW_MS - 1))
    log.forget_before(NOW)
    assert not log.samples["f"]
    for i in range(state.STREAM_LENGTH + 5):
        log.add(result(f"r{i}", NOW))
    assert len(log.stream) == state.STREAM_LENGTH
    assert log.get("r0") is None and log.get(f"r{state.STREAM_LENGTH + 4}") is not None


def test_the_stream_is_newest_first_and_filters() -> None:
    log = state.InvocationLog()
    log.add(result("1", NOW, fn="a"))
    log.add(result("2", NOW, fn="b", status="error"))
    log.add(result("3", NOW, fn="a", start="pool"))
    assert [r["id"] for r in log.recent()] == ["3", "2", "1"]
    assert [r["id"] for r in log.recent(function="a")] == ["3", "1"]
    assert [r["id"] for r in log.recent(status="error")] == ["2"]
    assert [r["id"] for r in log.recent(start="pool")] == ["3"]
    assert [r["id"] for r in log.recent(limit=1)] == ["3"]
    assert log.recent(status="error")[0]["error"] == "boom"


def heartbeat(node: str, *, at_ms: int = NOW, cordoned: bool = False) -> NodeHeartbeat:
    return NodeHeartbeat(
        node=node,
        incarnation="i1",
        labels={"stoker.io/role": "runtime"},
        taints=[Taint(key="stoker.io/dedicated", value="runtime")],
        instances=[
            InstanceSummary(instance="a", state="generic"),
            InstanceSummary(instance="b", state="ready", function="f", function_version="v1", uses=3),
            InstanceSummary(instance="c", state="busy", function="f", function_version="v1"),
        ],
        unschedulable=cordoned,
        interval_ms=2000,
        at_ms=at_ms,
    )


def test_the_cluster_shows_instances_by_state_figures_and_isolations() -> None:
    nodes = {
        "runtime-0": heartbeat("runtime-0", cordoned=True),
        "runtime-1": heartbeat("runtime-1", at_ms=NOW - 60_000),
        "gone": NodeStopped(node="gone", incarnation="i0"),
    }
    metrics = {"runtime-0": NodeMetrics(node="runtime-0", incarnation="i1", interval_ms=2000, cpu_millis=512.25)}
    overrides = {
        "hog": PlacementOverride(function="hog", until_ms=NOW + 60_000, reason="cpu", by="throttler"),
        "over": PlacementOverride(function="over", until_ms=NOW - 1, reason="old", by="user"),
    }
    decisions = [
        ThrottleDecided(function="hog", action="clamp", rule="r1", at_ms=NOW - 2000),
        ThrottleDecided(function="hog", action="isolate", rule="r2", at_ms=NOW - 1000),
    ]
    view = state.cluster_view(nodes, metrics, overrides, decisions, NOW)
    by_name = {n["name"]: n for n in view["nodes"]}
    zero = by_name["runtime-0"]
    assert zero["up"] and zero["cordoned"] and zero["role"] == "runtime"
    assert zero["by_state"] == {"generic": 1, "specializing": 0, "ready": 1, "busy": 1}
    assert zero["cpu_millis"] == 512.2 and zero["memory_mb"] == 0.0
    assert zero["taints"] == ["stoker.io/dedicated=runtime:NoSchedule"]
    assert {"instance": "b", "state": "ready", "function": "f", "version": "v1", "uses": 3} in zero["instances"]
    assert by_name["runtime-1"]["up"] is False  # its heartbeat is a minute old
    assert by_name["runtime-1"]["cpu_millis"] is None
    assert by_name["gone"] == {"name": "gone", "up": False, "stopped": True, "instances": [], "by_state": {}}
    assert [i["function"] for i in view["isolations"]] == ["hog"]  # the expired one is not shown
    assert [d["action"] for d in view["decisions"]] == ["isolate", "clamp"]


def test_builds_newest_first_with_their_outcome() -> None:
    history = [
        BuildStarted(function="f", build_id="b1", repo="r", ref="main", commit="c1", at_ms=1),
        BuildFinished(function="f", build_id="b1", status="ok", digest="d1", duration_ms=12.34, log_uri="file:///l"),
        BuildStarted(function="f", build_id="b2", repo="r", ref="main", commit="c2", at_ms=2),
    ]
    rows = state.builds_view(history)
    assert [r["build"] for r in rows] == ["b2", "b1"]
    assert rows[0]["status"] == "building"
    assert rows[1] == {
        "build": "b1",
        "status": "ok",
        "started": 1,
        "commit": "c1",
        "ref": "main",
        "digest": "d1",
        "duration_ms": 12.3,
        "reason": "",
        "has_log": True,
    }


FLOW = WorkflowSpec(
    name="flow",
    steps=[
        StepSpec(id="first", function="f"),
        StepSpec(id="fan", function="f", after=["first"], map="$.input.items"),
        StepSpec(id="maybe", function="f", after=["first"], when="$.input.loud"),
        StepSpec(id="last", function="f", after=["fan"]),
    ],
)


def test_a_run_shows_each_step_with_status_timing_and_output() -> None:
    t = NOW
    events: list[state.RunEvent] = [
        RunStarted(run="r1", workflow=FLOW, input={"items": [1, 2]}, at_ms=t),
        StepStarted(run="r1", step="first", invocation="i1", at_ms=t + 1),
        StepFinished(run="r1", step="first", status="ok", output="one", start="warm", at_ms=t + 11),
        StepFinished(run="r1", step="maybe", status="skipped", at_ms=t + 12),
        StepStarted(run="r1", step="fan", item=0, invocation="i2", at_ms=t + 12),
        StepStarted(run="r1", step="fan", item=1, invocation="i3", at_ms=t + 13),
        StepFinished(run="r1", step="fan", item=1, status="ok", output="b", start="pool", at_ms=t + 30),
        StepFinished(run="r1", step="fan", item=0, status="ok", output="a", start="warm", at_ms=t + 40),
    ]
    running = state.run_view(events)
    steps = {s["id"]: s for s in running["steps"]}
    assert running["status"] == "running"
    assert steps["first"]["status"] == "ok" and steps["first"]["took_ms"] == 10 and steps["first"]["output"] == "one"
    assert steps["maybe"]["status"] == "skipped"
    assert steps["fan"]["status"] == "running" and steps["fan"]["items"] == 2
    assert steps["fan"]["output"] == ["a", "b"] and steps["fan"]["took_ms"] == 28
    assert steps["last"]["status"] == "waiting"
    events += [
        StepStarted(run="r1", step="last", invocation="i4", at_ms=t + 41),
        StepFinished(run="r1", step="last", status="error", error=ErrorInfo(kind="boom", message="no"), at_ms=t + 50),
        RunFinished(
            run="r1", workflow="flow", status="error", error=ErrorInfo(kind="step_failed", message="last"), at_ms=t + 51
        ),
    ]
    done = state.run_view(events)
    steps = {s["id"]: s for s in done["steps"]}
    assert done["status"] == "error" and done["took_ms"] == 51
    assert steps["fan"]["status"] == "ok"  # every item finished ok
    assert steps["last"]["status"] == "error" and steps["last"]["error"]["kind"] == "boom"
    assert steps["last"]["after"] == ["fan"]


def test_the_run_book_keeps_runs_it_saw_begin() -> None:
    book = state.RunBook()
    book.add(StepStarted(run="before", step="first", invocation="x"))  # begun before the console looked
    assert book.view("before") is None
    book.add(RunStarted(run="r2", workflow=FLOW, at_ms=NOW))
    assert book.of("flow") == [{"run": "r2", "status": "running", "started_ms": NOW, "took_ms": None}]
    assert book.of("other") == []


def test_a_trace_becomes_waterfall_rows_in_tree_order() -> None:
    ms = 1_000_000
    spans = [
        {
            "trace_id": "t",
            "span_id": "c",
            "parent_id": "b",
            "name": "exec",
            "service": "agent",
            "start_ns": 5 * ms,
            "end_ns": 9 * ms,
            "status": "UNSET",
            "attributes": {"stoker.start": "warm", "x": 1},
        },
        {
            "trace_id": "t",
            "span_id": "a",
            "parent_id": None,
            "name": "POST",
            "service": "gateway",
            "start_ns": 0,
            "end_ns": 10 * ms,
            "status": "UNSET",
            "attributes": {},
            "links": [{"trace_id": "build", "span_id": "z"}],
        },
        {
            "trace_id": "t",
            "span_id": "b",
            "parent_id": "a",
            "name": "dispatch",
            "service": "dispatcher",
            "start_ns": 1 * ms,
            "end_ns": 2 * ms,
            "status": "UNSET",
            "attributes": {},
        },
        {
            "trace_id": "other",
            "span_id": "o",
            "parent_id": None,
            "name": "no",
            "service": "x",
            "start_ns": 0,
            "end_ns": 1,
            "attributes": {},
        },
    ]
    view = state.waterfall(spans, "t")
    assert [(r["name"], r["depth"]) for r in view["spans"]] == [("POST", 0), ("dispatch", 1), ("exec", 2)]
    assert view["spans"][2]["start_ms"] == 5.0 and view["spans"][2]["duration_ms"] == 4.0
    assert view["spans"][2]["attributes"] == {"stoker.start": "warm"}
    assert view["linked"] == ["build"] and view["complete"] is True
    assert state.waterfall(spans[:1], "t")["complete"] is False  # the root is not written yet


def test_percentile_is_nearest_rank() -> None:
    assert state.percentile([], 50) is None
    assert state.percentile([5.0], 99) == 5.0
    assert state.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert state.percentile([float(i) for i in range(1, 101)], 99) == 99.0
