"""What the console shows, computed from the records it reads: pure, no I/O, tested on its own.

The console's core feeds records in (results, node heartbeats and metrics, throttle decisions, builds,
workflow runs) and asks for views (plain JSON-ready dicts) that the pages render. Time is always passed
in, so every figure can be checked against a hand-made series.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from events import (
    InvocationCompleted,
    NodeHeartbeat,
    NodeMetrics,
    NodeStopped,
    PlacementOverride,
    ThrottleDecided,
)
from events.code import BuildFinished, BuildStarted
from events.workflow import RunFinished, RunStarted, StepFinished, StepStarted, WorkflowSpec
from services.common.operations import builds_of

STATS_WINDOW_MS = 5 * 60_000
"""How far back the per-function figures and charts look."""
RATE_WINDOW_MS = 60_000
"""Invocations per second, p50/p99, error rate and start kinds: over the last minute."""
BUCKET_MS = 10_000
"""One point of a function's charts."""
STREAM_LENGTH = 2_000
"""Invocations the console remembers for its stream and invocation pages."""
RUNS_KEPT = 500
INSTANCE_STATES = ("generic", "specializing", "ready", "busy")


def summary_of(result: InvocationCompleted) -> dict[str, Any]:
    """One line of the invocation stream."""
    return {
        "id": result.id,
        "function": result.function,
        "status": result.status,
        "start": result.start,
        "node": result.node,
        "instance": result.instance,
        "version": result.function_version,
        "total_ms": round(result.timings_ms.total, 2),
        "completed_ms": result.completed_ms,
        "error": result.error.kind if result.error else None,
    }


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile of already sorted values (None for none)."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil without floats drifting
    return sorted_values[min(len(sorted_values), int(rank)) - 1]


@dataclass
class _Sample:
    at_ms: int
    status: str
    start: str | None
    total_ms: float


@dataclass
class InvocationLog:
    """The recent results: a bounded stream by id, and per-function samples for the figures."""

    stream: OrderedDict[str, InvocationCompleted] = field(default_factory=OrderedDict)
    samples: dict[str, deque[_Sample]] = field(default_factory=dict)

    def add(self, result: InvocationCompleted) -> None:
        self.stream[result.id] = result
        self.stream.move_to_end(result.id)
        while len(self.stream) > STREAM_LENGTH:
            self.stream.popitem(last=False)
        samples = self.samples.setdefault(result.function, deque())
        sample = _Sample(result.completed_ms, result.status, result.start, result.timings_ms.total)
        if samples and samples[-1].at_ms > sample.at_ms:  # results of several partitions interleave
            ordered = list(samples)
            bisect.insort(ordered, sample, key=lambda s: s.at_ms)
            samples.clear()
            samples.extend(ordered)
        else:
            samples.append(sample)

    def get(self, ident: str) -> InvocationCompleted | None:
        return self.stream.get(ident)

    def recent(
        self,
        *,
        function: str | None = None,
        status: str | None = None,
        start: str | None = None,
        limit: int = 200,
    ) -> list[dict[str, Any]]:
        """The newest results first, filtered as the stream page asks."""
        shown: list[dict[str, Any]] = []
        for result in reversed(self.stream.values()):
            if function and result.function != function:
                continue
            if status and result.status != status:
                continue
            if start and result.start != start:
                continue
            shown.append(summary_of(result))
            if len(shown) >= limit:
                break
        return shown

    def forget_before(self, now_ms: int) -> None:
        for samples in self.samples.values():
            while samples and samples[0].at_ms < now_ms - STATS_WINDOW_MS:
                samples.popleft()

    def figures(self, function: str, now_ms: int) -> dict[str, Any]:
        """Rate, latency, errors and start kinds over the last minute, and 10-second chart points."""
        samples = [s for s in self.samples.get(function, ()) if s.at_ms >= now_ms - STATS_WINDOW_MS]
        last = [s for s in samples if s.at_ms >= now_ms - RATE_WINDOW_MS]
        totals = sorted(s.total_ms for s in last)
        starts: dict[str, int] = {}
        for s in last:
            if s.start:
                starts[s.start] = starts.get(s.start, 0) + 1
        started = sum(starts.values())
        errors = sum(1 for s in last if s.status != "ok")
        first_bucket = (now_ms - STATS_WINDOW_MS) // BUCKET_MS * BUCKET_MS
        buckets: list[dict[str, Any]] = []
        for begin in range(first_bucket, now_ms + 1, BUCKET_MS):
            inside = [s for s in samples if begin <= s.at_ms < begin + BUCKET_MS]
            lat = sorted(s.total_ms for s in inside)
            buckets.append(
                {
                    "at_ms": begin,
                    "per_s": round(len(inside) / (BUCKET_MS / 1000), 3),
                    "p50_ms": percentile(lat, 50),
                    "p99_ms": percentile(lat, 99),
                    "errors": sum(1 for s in inside if s.status != "ok"),
                    "cold": sum(1 for s in inside if s.start not in (None, "warm", "prewarmed")),
                }
            )
        return {
            "per_s": round(len(last) / (RATE_WINDOW_MS / 1000), 3),
            "count": len(last),
            "p50_ms": percentile(totals, 50),
            "p99_ms": percentile(totals, 99),
            "error_rate": round(errors / len(last), 4) if last else None,
            "start_share": {k: round(v / started, 4) for k, v in sorted(starts.items())} if started else {},
            "series": buckets,
        }


def cluster_view(
    nodes: Mapping[str, NodeHeartbeat | NodeStopped | Any],
    metrics: Mapping[str, NodeMetrics],
    overrides: Mapping[str, PlacementOverride],
    decisions: Iterable[ThrottleDecided],
    now_ms: int,
) -> dict[str, Any]:
    """Every node with its instances by state, its figures, and what is isolated where and why."""
    shown: list[dict[str, Any]] = []
    for name, rec in sorted(nodes.items()):
        if isinstance(rec, NodeStopped):
            shown.append({"name": name, "up": False, "stopped": True, "instances": [], "by_state": {}})
            continue
        if not isinstance(rec, NodeHeartbeat):
            continue  # node.observed (from Kubernetes) adds nothing an agent's heartbeat does not show
        by_state = {state: 0 for state in INSTANCE_STATES}
        for inst in rec.instances:
            by_state[inst.state] = by_state.get(inst.state, 0) + 1
        figures = metrics.get(name)
        shown.append(
            {
                "name": name,
                "up": rec.fresh(now_ms),
                "stopped": False,
                "last_seen_s": round((now_ms - rec.at_ms) / 1000, 1),
                "role": rec.labels.get("stoker.io/role", "runtime"),
                "labels": dict(sorted(rec.labels.items())),
                "taints": [f"{t.key}={t.value}:{t.effect}" if t.value else f"{t.key}:{t.effect}" for t in rec.taints],
                "cordoned": rec.unschedulable,
                "in_flight": rec.in_flight,
                "capacity": rec.capacity.model_dump(),
                "by_state": by_state,
                "instances": [
                    {
                        "instance": i.instance,
                        "state": i.state,
                        "function": i.function,
                        "version": i.function_version,
                        "uses": i.uses,
                    }
                    for i in rec.instances
                ],
                "cpu_millis": round(figures.cpu_millis, 1) if figures else None,
                "memory_mb": round(figures.memory_mb, 1) if figures else None,
            }
        )
    isolations = [
        {"function": name, "until_ms": o.until_ms, "reason": o.reason, "by": o.by, "selector": o.node_selector}
        for name, o in sorted(overrides.items())
        if o.active(now_ms)
    ]
    recent = [d.model_dump(mode="json", exclude={"version"}) for d in list(decisions)[-20:]]
    return {"nodes": shown, "isolations": isolations, "decisions": list(reversed(recent))}


def builds_view(history: Iterable[BuildStarted | BuildFinished]) -> list[dict[str, Any]]:
    """A function's builds, newest first (as the CLI and the API list them, with whether a log can be read)."""
    rows = builds_of(list(history))
    for row in rows:
        row["has_log"] = bool(row.pop("log_uri", None))
    return list(reversed(rows))


RunEvent = RunStarted | StepStarted | StepFinished | RunFinished


@dataclass
class RunBook:
    """Workflow runs by id, each its events in order, the oldest forgotten past :data:`RUNS_KEPT`."""

    runs: OrderedDict[str, list[RunEvent]] = field(default_factory=OrderedDict)

    def add(self, event: RunEvent) -> None:
        events = self.runs.get(event.run)
        if events is None:
            if not isinstance(event, RunStarted):
                return  # a run begun before the console looked: its definition is not known here
            events = self.runs[event.run] = []
            while len(self.runs) > RUNS_KEPT:
                self.runs.popitem(last=False)
        events.append(event)

    def of(self, workflow: str, limit: int = 50) -> list[dict[str, Any]]:
        shown = []
        for run_id in reversed(self.runs):
            view = self.view(run_id)
            if view and view["workflow"] == workflow:
                shown.append({k: view[k] for k in ("run", "status", "started_ms", "took_ms")})
                if len(shown) >= limit:
                    break
        return shown

    def view(self, run_id: str) -> dict[str, Any] | None:
        events = self.runs.get(run_id)
        return run_view(events) if events else None


def run_view(events: list[RunEvent]) -> dict[str, Any]:
    """One run: its DAG with each step's status, timing, start kind and output."""
    first = events[0]
    assert isinstance(first, RunStarted)
    spec = first.workflow
    steps: dict[str, dict[str, Any]] = {
        s.id: {
            "id": s.id,
            "function": s.function,
            "after": list(s.after),
            "status": "waiting",
            "attempts": 0,
            "items": 0,
            "took_ms": None,
            "start": None,
            "output": None,
            "error": None,
            "invocations": [],
        }
        for s in spec.steps
    }
    first_start: dict[str, int] = {}
    item_outputs: dict[str, dict[int, Any]] = {s.id: {} for s in spec.steps}
    view: dict[str, Any] = {
        "run": first.run,
        "workflow": spec.name,
        "status": "running",
        "started_ms": first.at_ms,
        "took_ms": None,
        "input": first.input,
        "output": None,
        "error": None,
    }
    for event in events[1:]:
        if isinstance(event, StepStarted) and event.step in steps:
            step = steps[event.step]
            first_start.setdefault(event.step, event.at_ms)
            step["attempts"] = max(step["attempts"], event.attempt)
            step["invocations"].append(event.invocation)
            if event.item is not None:
                step["items"] = max(step["items"], event.item + 1)
            if step["status"] in ("waiting", "error", "timeout"):
                step["status"] = "running"
        elif isinstance(event, StepFinished) and event.step in steps:
            step = steps[event.step]
            if event.step in first_start:  # from its first attempt's start to its last finish
                step["took_ms"] = event.at_ms - first_start[event.step]
            step["start"] = event.start or step["start"]
            if event.item is None:
                step["status"] = event.status
                step["output"] = event.output
                step["error"] = event.error.model_dump() if event.error else None
            else:
                item_outputs[event.step][event.item] = event.output
                if event.status != "ok":
                    step["status"] = event.status
                    step["error"] = event.error.model_dump() if event.error else None
        elif isinstance(event, RunFinished):
            view.update(
                status=event.status,
                output=event.output,
                error=event.error.model_dump() if event.error else None,
                took_ms=event.at_ms - first.at_ms,
            )
    if view["status"] != "running":
        # A mapped step's items each finish on their own; once the run ended, a step still shown
        # running had every item done (its failures were recorded above), or was never needed.
        for step in steps.values():
            if step["status"] == "running":
                step["status"] = "ok" if step["error"] is None else step["status"]
            elif step["status"] == "waiting":
                step["status"] = "not run"
    for step_id, outputs in item_outputs.items():
        if outputs:  # a mapped step's output is its items' outputs, in item order
            steps[step_id]["output"] = [outputs.get(i) for i in range(steps[step_id]["items"])]
    view["steps"] = list(steps.values())
    return view


def workflow_view(spec: WorkflowSpec) -> dict[str, Any]:
    """A definition's DAG: its steps and the edges between them."""
    return {
        "name": spec.name,
        "revision": spec.revision,
        "steps": [
            {"id": s.id, "function": s.function, "after": list(s.after), "map": s.map, "when": s.when}
            for s in spec.steps
        ],
        "source": spec.source,
    }


def waterfall(spans: list[dict[str, Any]], trace_id: str) -> dict[str, Any]:
    """One trace's spans as waterfall rows, in tree order (parents above children), times in ms from its start."""
    mine = [s for s in spans if s.get("trace_id") == trace_id]
    by_id = {s["span_id"]: s for s in mine}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for s in mine:
        parent = s.get("parent_id")
        children.setdefault(parent if parent in by_id else None, []).append(s)
    t0 = min((s["start_ns"] for s in mine), default=0)
    rows: list[dict[str, Any]] = []

    def walk(parent: str | None, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda s: s["start_ns"]):
            attrs = s.get("attributes", {})
            rows.append(
                {
                    "name": s["name"],
                    "service": s.get("service"),
                    "depth": depth,
                    "start_ms": round((s["start_ns"] - t0) / 1e6, 3),
                    "duration_ms": round((s["end_ns"] - s["start_ns"]) / 1e6, 3),
                    "status": s.get("status"),
                    "attributes": {k: v for k, v in attrs.items() if k.startswith("stoker.")},
                }
            )
            walk(s["span_id"], depth + 1)

    walk(None, 0)
    linked = []
    for s in mine:
        for link in s.get("links", []):
            if link["trace_id"] != trace_id and link["trace_id"] not in linked:
                linked.append(link["trace_id"])
    # The root (the first caller's span) ends last, so it is written last: until it is there, more may come.
    complete = any(not s.get("parent_id") for s in mine)
    return {"trace_id": trace_id, "spans": rows, "linked": linked, "complete": complete}
