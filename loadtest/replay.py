"""Trace replay: a window of the Azure Functions 2019 trace sample against the live platform.

    python -m loadtest trace [--sample 100] [--start-minute 1] [--minutes 60] [--functions 12]
                             [--compress 60] [--policies fixed,hybrid] [--exec sleep|spin]

The trace (Shahrad et al., "Serverless in the Wild", USENIX ATC 2020, CC-BY 4.0; the vHive sample in
``loadtest/data/azure-functions-2019-sample``) gives per-minute invocation counts per function
(``{N}_inv.csv``) and execution-time percentiles (``{N}_run.csv``); columns are found by header name.

- ``--functions`` functions invoked in the window (at most ``--max-per-minute`` per minute) are
  picked with the seed, and each becomes a Stoker function of its own running the same small code:
  it sleeps (or spins) for the time the payload says.
- Each minute's count is spread uniformly at random over the minute (seeded; the same arrivals as
  ``loadtest.keepalive_sim``), and each invocation's execution time is drawn from its function's
  ``_run`` percentiles (piecewise linear between p0, p1, p25, p50, p75, p99, p100).
- Time is compressed by ``--compress``: arrivals and execution times are divided by it, and so is
  the keep-alive: a platform started here gets ``STOKER_KEEPALIVE_FIXED_S`` = 600 / compress for the
  fixed run; on a running platform (``--bootstrap``) the fixed run creates its functions with
  ``idle_s`` = 600 / compress. For the hybrid run a platform started here gets
  ``STOKER_KEEPALIVE_TIME_SCALE`` = compress: the pool manager's hybrid policy divides its time
  constants (1-minute bins over 4 hours, the 10-minute standard keep-alive) by it, so it decides
  in trace minutes as ``loadtest.keepalive_sim`` does. A running platform (``--bootstrap``) keeps
  its own scale (see the report's notes).
- Invocations go through ``StokerClient`` (open loop, each when due). Reported per policy: the
  cold-start share (results whose ``start`` is not ``warm``/``prewarmed``), latency percentiles,
  and the instance-seconds held: the sum over node heartbeats (read from the node topic during
  the run) of the replayed functions' specialized instances times the heartbeat interval, also
  scaled back to trace time (x compress).
Target: the hybrid policy has fewer cold starts than a fixed 10-minute keep-alive at no more
instance-seconds held.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import csv
import logging
import random
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from events import FunctionSpec, NodeHeartbeat, NodeStopped, Record
from loadtest import harness, plots
from loadtest.harness import Target, console, fmt
from loadtest.keepalive_sim import DEFAULT_DATA, arrivals, open_sample
from loadtest.load import Outcome, Sample, describe, kafka_call, open_loop, start_results
from loadtest.stats import latency_summary, ratio
from services.common.client import StokerClient, package_code

PERCENTILES = (0, 1, 25, 50, 75, 99, 100)
FIXED_KEEPALIVE_S = 600.0
"""The fixed policy the target compares with: 10 minutes of trace time."""
HELD_STATES = frozenset({"specializing", "ready", "busy"})
"""Instance states that hold a function's code (generic and recycling instances do not)."""
WARM_KINDS = frozenset({"warm", "prewarmed"})
SLEEPER = """import time


def main(event):
    ms = (event or {}).get("ms", 0) / 1000.0
    if (event or {}).get("spin"):
        end = time.perf_counter() + ms
        while time.perf_counter() < end:
            pass
    elif ms > 0:
        time.sleep(ms)
    return None
"""


@dataclass(frozen=True)
class TraceFunction:
    """One function of the trace window."""

    function: str
    """``HashFunction``."""
    counts: list[int]
    """Invocations per minute of the window."""
    exec_percentiles_ms: dict[int, float]
    """``percentile_Average_{p}`` of ``_run.csv`` (milliseconds) for p in PERCENTILES."""
    average_ms: float


@dataclass(frozen=True)
class Planned:
    """One invocation of the replay."""

    due_s: float
    """Seconds from the start of the replay (compressed time)."""
    function: int
    """Index into the picked functions."""
    exec_ms: float
    """Execution time it asks for (compressed)."""


def load_window(directory: Path, sample: int, start_minute: int, minutes: int) -> list[TraceFunction]:
    """Every function of ``{sample}_inv.csv`` with its counts over ``[start_minute, start_minute + minutes)``."""
    run: dict[str, tuple[dict[int, float], float]] = {}
    with open_sample(directory, f"{sample}_run.csv") as f:
        for row in csv.DictReader(f):
            run[row["HashFunction"]] = (
                {p: float(row[f"percentile_Average_{p}"]) for p in PERCENTILES},
                float(row["Average"]),
            )
    out: list[TraceFunction] = []
    with open_sample(directory, f"{sample}_inv.csv") as f:
        for row in csv.DictReader(f):
            name = row["HashFunction"]
            if name not in run:
                raise ValueError(f"function {name} of {sample}_inv.csv has no row in {sample}_run.csv")
            counts = [int(row[f"minute_{m}"]) for m in range(start_minute, start_minute + minutes)]
            out.append(TraceFunction(name, counts, *run[name]))
    return out


def pick(functions: Sequence[TraceFunction], n: int, max_per_minute: int, rng: random.Random) -> list[TraceFunction]:
    """``n`` functions invoked in the window and never more than ``max_per_minute`` times a minute."""
    eligible = sorted(
        (f for f in functions if sum(f.counts) > 0 and max(f.counts) <= max_per_minute), key=lambda f: f.function
    )
    if len(eligible) <= n:
        return eligible
    return sorted(rng.sample(eligible, n), key=lambda f: f.function)


def draw_exec_ms(percentiles: dict[int, float], u: float) -> float:
    """The execution time at quantile ``u`` (0..1): linear between the trace's percentiles."""
    ps = list(PERCENTILES)
    x = u * 100
    i = min(max(bisect.bisect_right(ps, x) - 1, 0), len(ps) - 2)
    lo, hi = ps[i], ps[i + 1]
    a, b = percentiles[lo], percentiles[hi]
    return a + (b - a) * (x - lo) / (hi - lo)


def plan(functions: Sequence[TraceFunction], compress: float, rng: random.Random, max_exec_ms: float) -> list[Planned]:
    """Every invocation of the window, due times and execution times compressed by ``compress``."""
    out: list[Planned] = []
    for index, f in enumerate(functions):
        for t in arrivals(f.counts, rng):
            exec_ms = min(draw_exec_ms(f.exec_percentiles_ms, rng.random()) / compress, max_exec_ms)
            out.append(Planned(t / compress, index, round(exec_ms, 3)))
    out.sort(key=lambda p: p.due_s)
    return out


class HeldInstances:
    """Specialized instances of the replayed functions, from every heartbeat seen on the node topic."""

    def __init__(self, functions: set[str]) -> None:
        self.functions = functions
        self.beats: list[tuple[int, str, int, int]] = []
        """(at_ms, node, instances held, interval_ms) per heartbeat."""

    def on_record(self, record: Record) -> None:
        if isinstance(record, NodeHeartbeat):
            held = sum(1 for i in record.instances if i.function in self.functions and i.state in HELD_STATES)
            self.beats.append((record.at_ms, record.node, held, record.interval_ms))

    def instance_seconds(self, from_ms: int, to_ms: int) -> float:
        """Sum over heartbeats in ``[from_ms, to_ms)`` of instances held x heartbeat interval."""
        return sum(held * interval / 1000 for at, _, held, interval in self.beats if from_ms <= at < to_ms)

    def per_second(self, from_ms: int, seconds: int) -> list[float]:
        """Instances held, summed over nodes (each node's latest heartbeat), at each second."""
        latest: dict[str, int] = {}
        out: list[float] = []
        beats = sorted(self.beats)
        j = 0
        for s in range(seconds):
            edge = from_ms + (s + 1) * 1000
            while j < len(beats) and beats[j][0] < edge:
                latest[beats[j][1]] = beats[j][2]
                j += 1
            out.append(float(sum(latest.values())))
        return out


async def replay(
    where: Target,
    picked: Sequence[TraceFunction],
    planned: Sequence[Planned],
    idle_s: float | None,
    spin: bool,
    label: str,
    window_s: float,
) -> dict[str, Any]:
    """Create one Stoker function per trace function, replay the plan, and measure."""
    settings = where.settings
    suffix = uuid.uuid4().hex[:4]
    names = [f"tr-{f.function[:10]}-{suffix}" for f in picked]
    max_exec_s = max((p.exec_ms for p in planned), default=0.0) / 1000
    async with StokerClient(settings) as client:
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                Path(tmp, "handler.py").write_text(SLEEPER + f"# {name}\n")  # its own code and digest
                await client.put_function(
                    FunctionSpec(
                        name=name,
                        entrypoint="handler:main",
                        source=package_code(settings, Path(tmp)),
                        timeout_s=max(5.0, 2 * max_exec_s + 2),
                        idle_s=idle_s,
                    )
                )
        await start_results(client)
        await asyncio.sleep(1.0)  # the specs reach every view before the first request
        held = HeldInstances(set(names))
        beats = client.reader.tail(settings.topics.node, (NodeHeartbeat, NodeStopped), held.on_record)
        await beats.start()
        calls = [
            kafka_call(client, names[p.function], {"ms": p.exec_ms, "spin": spin}, timeout_s=60.0) for p in planned
        ]
        order = iter(range(len(planned)))
        by_function: dict[int, list[Sample]] = {}

        async def next_call() -> Outcome:
            return await calls[next(order)]()

        # Calls start in due order, so the i-th started call is the i-th planned invocation.
        started_ms = int(time.time() * 1000)
        try:
            with harness.progress() as bars:
                task = bars.add_task(f"trace replay ({label})", total=len(planned))
                samples, wall = await open_loop(
                    next_call, [p.due_s for p in planned], lambda: bars.advance(task), drain_timeout_s=90
                )
        finally:
            ended_ms = int(time.time() * 1000)
            await asyncio.sleep(0.6)  # the last heartbeats of the window
            await beats.stop()
        for name in names:
            await client.delete_function(name)
    # Samples come back in completion order: match them to the plan by due time.
    index_by_due: dict[float, list[int]] = {}
    for i, p in enumerate(planned):
        index_by_due.setdefault(p.due_s, []).append(i)
    matched: list[tuple[Planned, Sample]] = []
    for s in sorted(samples, key=lambda s: s.due_s):
        i = index_by_due[s.due_s].pop(0)
        matched.append((planned[i], s))
        by_function.setdefault(planned[i].function, []).append(s)
    ok = [s for s in samples if s.ok]
    cold = [s for s in ok if s.outcome.start not in WARM_KINDS]
    seconds = int(max(wall, window_s)) + 1
    invocations_per_s = [0.0] * seconds
    cold_per_s = [0.0] * seconds
    for s in ok:
        sec = min(int(s.due_s), seconds - 1)
        invocations_per_s[sec] += 1
        if s.outcome.start not in WARM_KINDS:
            cold_per_s[sec] += 1
    # Instances count over the replayed window only (its trace minutes, compressed), like the
    # simulation: not the drain after it, however long a straggler takes.
    replay_s = max(window_s, max((p.due_s + p.exec_ms / 1000 for p in planned), default=0.0))
    window_end_ms = min(ended_ms, started_ms + int(replay_s * 1000))
    instance_s = held.instance_seconds(started_ms, window_end_ms)
    overhead = [
        s.latency_ms - (s.outcome.timings_ms or {}).get("exec", 0.0) for s in ok if s.outcome.timings_ms is not None
    ]
    return {
        "functions": dict(zip(names, (f.function for f in picked), strict=True)),
        "idle_s": idle_s,
        **describe(samples, wall),
        "cold_starts": len(cold),
        "cold_start_share_pct": round(100 * len(cold) / len(ok), 2) if ok else None,
        "latency_minus_exec_ms": latency_summary(overhead),
        "cold_latency_ms": latency_summary([s.latency_ms for s in cold]),
        "warm_latency_ms": latency_summary([s.latency_ms for s in ok if s.outcome.start in WARM_KINDS]),
        "instance_seconds_held": round(instance_s, 2),
        "heartbeats": len(held.beats),
        "window_s": round((window_end_ms - started_ms) / 1000, 2),
        "per_function": {
            names[i]: {
                "invocations": len(ss),
                "cold": sum(1 for s in ss if s.ok and s.outcome.start not in WARM_KINDS),
            }
            for i, ss in sorted(by_function.items())
        },
        "series": {
            "invocations": invocations_per_s,
            "cold": cold_per_s,
            "held": held.per_second(started_ms, seconds),
        },
    }


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("stoker.table").setLevel(logging.ERROR)  # node commands share the node topic
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of the trace sample")
    parser.add_argument("--sample", type=int, choices=(100, 1000), default=100)
    parser.add_argument("--start-minute", type=int, default=1, help="first trace minute of the window (1..1440)")
    parser.add_argument("--minutes", type=int, default=60, help="trace minutes to replay")
    parser.add_argument("--functions", type=int, default=12, help="functions picked from the window")
    parser.add_argument("--max-per-minute", type=int, default=60, help="skip functions busier than this")
    parser.add_argument("--compress", type=float, default=60.0, help="trace seconds per replayed second")
    parser.add_argument("--policies", default="fixed,hybrid", help="runs: fixed (10 min, scaled), hybrid")
    parser.add_argument("--exec", choices=("sleep", "spin"), default="sleep", help="how a function spends its time")
    parser.add_argument("--max-exec-ms", type=float, default=2000.0, help="cap of one (compressed) execution")
    parser.add_argument("--max-instances", type=int, default=16, help="STOKER_MAX_INSTANCES of a platform started here")
    harness.add_common_args(parser)
    args = parser.parse_args(argv)
    if not 1 <= args.start_minute <= args.start_minute + args.minutes - 1 <= 1440:
        parser.error("the window must lie within minutes 1..1440")
    policies = [p for p in args.policies.split(",") if p]
    if bad := [p for p in policies if p not in ("fixed", "hybrid")]:
        parser.error(f"unknown policies {bad}")
    rng = random.Random(args.seed)
    window = load_window(args.data, args.sample, args.start_minute, args.minutes)
    picked = pick(window, args.functions, args.max_per_minute, rng)
    if not picked:
        parser.error("no function of the window is invoked within the limits")
    planned = plan(picked, args.compress, rng, args.max_exec_ms)
    fixed_s = FIXED_KEEPALIVE_S / args.compress
    report = harness.new_report(
        "trace",
        args,
        {
            "data": str(args.data),
            "sample": args.sample,
            "start_minute": args.start_minute,
            "minutes": args.minutes,
            "functions": len(picked),
            "max_per_minute": args.max_per_minute,
            "compress": args.compress,
            "exec": args.exec,
            "max_exec_ms": args.max_exec_ms,
            "invocations": len(planned),
            "replay_s": round(args.minutes * 60 / args.compress, 1),
            "fixed_keepalive_s": fixed_s,
            "trace_functions": [f.function for f in picked],
            "policies": policies,
        },
    )
    console.print(
        f"{len(picked)} functions, {len(planned)} invocations over {args.minutes} trace minutes, "
        f"replayed in {args.minutes * 60 / args.compress:.0f}s (x{args.compress:g}); fixed keep-alive {fixed_s:g}s"
    )
    running = harness.wants_running(args)
    runs: dict[str, Any] = {}
    for policy in policies:
        env = {"STOKER_MAX_INSTANCES": str(args.max_instances)}
        if policy == "fixed":
            env.update({"STOKER_KEEPALIVE": "fixed", "STOKER_KEEPALIVE_FIXED_S": f"{fixed_s:g}"})
        else:
            env.update({"STOKER_KEEPALIVE": "hybrid", "STOKER_KEEPALIVE_TIME_SCALE": f"{args.compress:g}"})
        with harness.target(args, env) as where:
            idle_s = fixed_s if (policy == "fixed" and running) else None
            run = asyncio.run(
                replay(where, picked, planned, idle_s, args.exec == "spin", policy, args.minutes * 60 / args.compress)
            )
            run["platform"] = where.describe()
            run["instance_seconds_held_trace_time"] = round(run["instance_seconds_held"] * args.compress, 1)
            runs[policy] = run
    report["runs"] = runs
    if "fixed" in runs and "hybrid" in runs:
        f, h = runs["fixed"], runs["hybrid"]
        report["hybrid_vs_fixed"] = {
            "cold_starts": ratio(h["cold_starts"], f["cold_starts"]),
            "instance_seconds_held": ratio(h["instance_seconds_held"], f["instance_seconds_held"]),
            "fewer_cold_starts": h["cold_starts"] < f["cold_starts"],
            "no_more_instance_seconds": h["instance_seconds_held"] <= f["instance_seconds_held"],
        }
    report["notes"] = [
        f"The hybrid run's platform divides the policy's time constants by {args.compress:g} "
        "(STOKER_KEEPALIVE_TIME_SCALE), so bins, range and standard keep-alive are trace minutes."
        if not running
        else "A running platform (--bootstrap) keeps its own STOKER_KEEPALIVE_TIME_SCALE: unless it was started "
        f"with {args.compress:g}, the hybrid policy decides in wall-clock minutes, not trace minutes.",
        "A pre-warm is counted honestly: a call that finds its pre-warmed instance still loading starts cold.",
    ]
    table = Table(
        "policy",
        "invocations",
        "ok",
        "cold starts",
        "cold share %",
        "p50 ms",
        "p99 ms",
        "p50 minus exec ms",
        "instance-s held",
        "in trace time",
        title=f"Trace replay: {len(picked)} functions, {args.minutes} trace minutes at x{args.compress:g}",
    )
    for policy, run in runs.items():
        table.add_row(
            policy if policy != "fixed" else f"fixed {fixed_s:g}s (10 min / {args.compress:g})",
            fmt(run["requests"]),
            fmt(run["ok"]),
            fmt(run["cold_starts"]),
            fmt(run["cold_start_share_pct"]),
            fmt(run["latency_ms"].get("p50")),
            fmt(run["latency_ms"].get("p99")),
            fmt(run["latency_minus_exec_ms"].get("p50")),
            fmt(run["instance_seconds_held"], 1),
            fmt(run["instance_seconds_held_trace_time"], 0),
        )
    console.print(table)
    if "hybrid_vs_fixed" in report:
        c = report["hybrid_vs_fixed"]
        console.print(
            f"hybrid / fixed: cold starts {fmt(c['cold_starts'])}, instance-seconds {fmt(c['instance_seconds_held'])} "
            "(target: fewer cold starts at no more instance-seconds)"
        )
    if not args.no_plot:
        png = plots.trace_timeline(
            {p: r["series"] for p, r in runs.items()},
            harness.plot_path(args.out, "trace", "timeline"),
            f"Trace replay, {args.minutes} trace minutes at x{args.compress:g}",
        )
        report["plots"] = [png.name] if png else []
    harness.save(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
