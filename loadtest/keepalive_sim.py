"""Keep-alive policies on the Azure Functions trace: cold starts and idle instance-seconds, fixed vs hybrid.

    python -m loadtest.keepalive_sim [--sample 100|1000] [--functions N] [--minutes 1440]
                                     [--fixed-minutes 10] [--seed 1] [--prewarm-load-s 1]
                                     [--no-variants] [--no-plot] [--out loadtest/results]

Replays the per-minute invocation counts of the Azure Functions 2019 trace sample (Shahrad et al.,
"Serverless in the Wild", USENIX ATC 2020, CC-BY 4.0) against the pool manager's own policies from
``services.poolmgr.keepalive``, with the paper's model of an application's memory: per function one
instance, loaded or not. An invocation that finds it not loaded is a cold start (and loads it,
instantly); invocations that overlap share it. Idle instance-seconds are the seconds it is loaded
but runs nothing. Invocations of a minute are spread uniformly at random over that minute (seeded);
each runs for the function's average execution time from ``*_run.csv``. The hybrid policy learns
online: at the end of each invocation it decides from the idle times seen so far, never later ones.
An instance still loaded when the simulated window ends counts idle up to that end. A pre-warm
takes ``--prewarm-load-s`` to load: a call that comes before it is ready is a cold start.

Besides the two policies compared (hybrid against fixed ``--fixed-minutes``), it runs fixed
keep-alives of 5, 10, 20, 30, 60 and 120 minutes and the hybrid variants (the paper's own
parameters, without the forecast, other forecasts) and draws them as a Pareto plot: cold-start
share against idle instance-seconds (``keepalive-<when>-pareto.png``, with matplotlib).
Target: hybrid <= 0.5x the cold starts of fixed 10 min at <= 1.0x its idle instance-seconds, and
no group of functions (by invocations) with more cold starts than fixed.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
from rich.console import Console
from rich.table import Table

from loadtest import plots
from loadtest.stats import machine_facts, percentile
from services.poolmgr.keepalive import FixedPolicy, HybridPolicy, KeepAlivePolicy

console = Console()
DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "azure-functions-2019-sample"


def open_sample(directory: Path, name: str) -> IO[str]:
    """A file of the trace sample, as text; the largest are kept gzipped (``name.gz``)."""
    plain = directory / name
    if plain.exists():
        return plain.open(newline="")
    return gzip.open(directory / f"{name}.gz", "rt", newline="")


TRACE_MINUTES = 1440


@dataclass(frozen=True)
class FunctionTrace:
    """One function of the trace sample."""

    function: str
    """``HashFunction`` of the trace."""
    counts: list[int]
    """Invocations per minute, from minute 1."""
    duration_s: float
    """Average execution time (``Average`` of ``*_run.csv``), seconds."""


@dataclass(frozen=True)
class Outcome:
    """What one policy gave for one function."""

    invocations: int
    cold_starts: int
    idle_s: float
    """Seconds the instance was loaded but ran nothing."""
    final_reason: str
    """The policy's decision after the last invocation (what it had learned by the end)."""


def load_sample(directory: Path, sample: int, functions: int | None, minutes: int) -> list[FunctionTrace]:
    """The first ``functions`` functions (all with ``None``) of ``{sample}_inv.csv``, first ``minutes`` minutes.

    Columns are found by header name: their order differs between versions of the sample.
    """
    durations: dict[str, float] = {}
    with open_sample(directory, f"{sample}_run.csv") as f:
        for run_row in csv.DictReader(f):
            durations[run_row["HashFunction"]] = float(run_row["Average"]) / 1000.0
    traces: list[FunctionTrace] = []
    with open_sample(directory, f"{sample}_inv.csv") as f:
        reader = csv.reader(f)
        header = next(reader)
        name_col = header.index("HashFunction")
        minute_cols = [header.index(f"minute_{m}") for m in range(1, minutes + 1)]
        for row in reader:
            if functions is not None and len(traces) >= functions:
                break
            name = row[name_col]
            if name not in durations:
                raise ValueError(f"function {name} of {sample}_inv.csv has no row in {sample}_run.csv")
            traces.append(FunctionTrace(name, [int(row[c]) for c in minute_cols], durations[name]))
    return traces


def arrivals(counts: Sequence[int], rng: random.Random) -> list[float]:
    """Invocation times (seconds from the start), each minute's count spread uniformly over the minute."""
    out: list[float] = []
    rand = rng.random
    for minute, n in enumerate(counts):
        if n:
            base = minute * 60.0
            out.extend(sorted(base + 60.0 * rand() for _ in range(n)))
    return out


def simulate(
    times: Sequence[float], duration_s: float, policy: KeepAlivePolicy, end_s: float, prewarm_load_s: float = 0.0
) -> Outcome:
    """One function's instance under ``policy``: cold starts and idle seconds over ``[0, end_s]``.

    Per gap between the end of the busy period and the next arrival, the decision made at that end
    says whether the arrival is warm (:meth:`KeepAliveDecision.wants_loaded`) and how long the
    instance idled: loaded over ``[prewarm_after_s, unload_after_s]`` of the gap. A pre-warm takes
    ``prewarm_load_s`` to load: an arrival before it is ready is a cold start (the instance's
    memory counts from the pre-warm point all the same). Computed per gap, not per second: this
    is the loop that must stay fast for the 608k invocations of the day.
    """
    if not times:
        return Outcome(0, 0, 0.0, "never invoked")
    hist = policy.new_histogram()
    record = hist.record_arrival
    decide = policy.decide
    first = times[0]
    record(first, duration_s)
    busy_until = first + duration_s
    cold = 1  # nothing is loaded before the first invocation
    idle = 0.0
    for i in range(1, len(times)):
        t = times[i]
        if t > busy_until:
            gap = t - busy_until
            d = decide(hist)  # from the idle times before this arrival only: online learning
            p = d.prewarm_after_s
            unload = p + d.keep_alive_s
            if gap < p:
                cold += 1  # unloaded after the invocation, not pre-warmed yet
            elif p > 0 and gap < p + prewarm_load_s:
                cold += 1  # the pre-warm was late: still loading when the call came
                idle += gap - p
            elif gap <= unload:
                idle += gap - p
            else:
                cold += 1
                idle += unload - p
            busy_until = t + duration_s
        elif t + duration_s > busy_until:
            busy_until = t + duration_s
        record(t, duration_s)
    last = decide(hist)
    if end_s > busy_until:
        gap = end_s - busy_until
        p = last.prewarm_after_s
        idle += max(0.0, min(gap, last.unload_after_s) - p)
    return Outcome(len(times), cold, idle, last.reason)


def totals(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Figures over all functions: totals, and the per-function cold-start share as the paper plots it."""
    invocations = sum(o.invocations for o in outcomes)
    cold = sum(o.cold_starts for o in outcomes)
    idle = sum(o.idle_s for o in outcomes)
    shares = sorted(100.0 * o.cold_starts / o.invocations for o in outcomes if o.invocations)
    reasons = Counter(o.final_reason.split(" (")[0] for o in outcomes if o.invocations)
    return {
        "functions_invoked": len(shares),
        "invocations": invocations,
        "cold_starts": cold,
        "cold_start_pct": round(100.0 * cold / invocations, 3) if invocations else None,
        "per_function_cold_start_pct_p50": round(percentile(shares, 50), 3) if shares else None,
        "per_function_cold_start_pct_p75": round(percentile(shares, 75), 3) if shares else None,
        "idle_instance_s": round(idle, 1),
        "final_decisions": dict(reasons.most_common()),
    }


BUCKETS: tuple[tuple[int, int | None], ...] = ((1, 1), (2, 5), (6, 24), (25, 99), (100, 499), (500, 1499), (1500, None))
"""Functions grouped by invocations in the window: where each policy wins or loses."""


def by_invocations(outcomes: dict[str, list[Outcome]]) -> list[dict[str, Any]]:
    """Cold starts and idle instance-seconds per policy, for functions grouped by their invocation count."""
    labels = list(outcomes)
    rows = []
    for lo, hi in BUCKETS:
        picked = [
            i for i, o in enumerate(outcomes[labels[0]]) if o.invocations >= lo and (hi is None or o.invocations <= hi)
        ]
        row: dict[str, Any] = {
            "invocations": f"{lo}+" if hi is None else (str(lo) if hi == lo else f"{lo}-{hi}"),
            "functions": len(picked),
            "total_invocations": sum(outcomes[labels[0]][i].invocations for i in picked),
        }
        for label in labels:
            row[label] = {
                "cold_starts": sum(outcomes[label][i].cold_starts for i in picked),
                "idle_instance_s": round(sum(outcomes[label][i].idle_s for i in picked), 1),
            }
        rows.append(row)
    return rows


def run(
    traces: Sequence[FunctionTrace],
    policies: dict[str, KeepAlivePolicy],
    end_s: float,
    seed: int,
    prewarm_load_s: float = 0.0,
) -> tuple[dict[str, list[Outcome]], dict[str, float]]:
    """Every function under every policy, on the same arrivals; also the seconds each policy took."""
    rng = random.Random(seed)
    outcomes: dict[str, list[Outcome]] = {label: [] for label in policies}
    took = dict.fromkeys(policies, 0.0)
    took["arrivals"] = 0.0
    for trace in traces:
        started = time.perf_counter()
        times = arrivals(trace.counts, rng)
        took["arrivals"] += time.perf_counter() - started
        for label, policy in policies.items():
            started = time.perf_counter()
            outcomes[label].append(simulate(times, trace.duration_s, policy, end_s, prewarm_load_s))
            took[label] += time.perf_counter() - started
    return outcomes, took


PARETO_FIXED_MINUTES = (5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
"""Fixed keep-alives drawn on the Pareto plot."""


def hybrid_variants() -> dict[str, HybridPolicy]:
    """The hybrid policy as configured, and the variants measured against it."""
    return {
        "hybrid": HybridPolicy(),
        "hybrid, paper's parameters (4 h fallback, p5-p99 only, no forecast)": HybridPolicy(
            fallback_keep_alive_s=4 * 3600.0,
            floor_no_prewarm=False,
            forecast=None,
            cold_start_cost_s=None,
            tail_pct=99.0,
            tail_margin=None,
        ),
        "hybrid, p5-p99 window only": HybridPolicy(cold_start_cost_s=None, tail_pct=99.0, tail_margin=None),
        "hybrid, p99 tail, 10% margins (the last version)": HybridPolicy(
            tail_pct=99.0, tail_margin=None, alternative_tail_pcts=(95.0,), cold_start_cost_s=2700.0
        ),
        "hybrid, no forecast": HybridPolicy(forecast=None),
        "hybrid, forecast = last": HybridPolicy(forecast="last"),
        "hybrid, forecast = ses": HybridPolicy(forecast="ses"),
        "hybrid, forecast from 1 idle time beyond 4 h": HybridPolicy(forecast_min_samples=1),
        "hybrid, cold start = 1800 s idle": HybridPolicy(cold_start_cost_s=1800.0),
        "hybrid, cold start = 3600 s idle": HybridPolicy(cold_start_cost_s=3600.0),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=int, choices=(100, 1000), default=1000, help="functions in the sample file")
    parser.add_argument("--functions", type=int, default=None, help="only the first N functions (default: all)")
    parser.add_argument("--minutes", type=int, default=TRACE_MINUTES, help="simulated minutes from the start")
    parser.add_argument("--fixed-minutes", type=float, default=10.0, help="keep-alive of the fixed policy")
    parser.add_argument("--seed", type=int, default=1, help="seed of the arrival times within each minute")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of the trace sample")
    parser.add_argument("--prewarm-load-s", type=float, default=1.0, help="time a pre-warm takes to load")
    parser.add_argument("--no-variants", action="store_true", help="only fixed and hybrid, no Pareto runs")
    parser.add_argument("--no-plot", action="store_true", help="no Pareto plot")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    args = parser.parse_args(argv)
    if not 1 <= args.minutes <= TRACE_MINUTES:
        parser.error(f"--minutes must be within 1..{TRACE_MINUTES}")
    if args.functions is not None and args.functions < 1:
        parser.error("--functions must be >= 1")

    started = time.perf_counter()
    traces = load_sample(args.data, args.sample, args.functions, args.minutes)
    load_s = time.perf_counter() - started
    fixed = FixedPolicy(args.fixed_minutes * 60.0)
    hybrid = HybridPolicy()
    fixed_label = f"fixed {args.fixed_minutes:g} min"
    policies: dict[str, KeepAlivePolicy] = {fixed_label: fixed, "hybrid": hybrid}
    if not args.no_variants:
        for minutes in PARETO_FIXED_MINUTES:
            policies.setdefault(f"fixed {minutes:g} min", FixedPolicy(minutes * 60.0))
        for label, variant in hybrid_variants().items():
            policies.setdefault(label, variant)
    outcomes, took = run(traces, policies, args.minutes * 60.0, args.seed, args.prewarm_load_s)
    figures = {label: totals(outs) for label, outs in outcomes.items()}
    f, h = figures[fixed_label], figures["hybrid"]
    ratios = {
        "cold_starts": _ratio(h["cold_starts"], f["cold_starts"]),
        "per_function_cold_start_pct_p75": _ratio(
            h["per_function_cold_start_pct_p75"], f["per_function_cold_start_pct_p75"]
        ),
        "idle_instance_s": _ratio(h["idle_instance_s"], f["idle_instance_s"]),
    }
    groups_worse = [
        row["invocations"]
        for row in by_invocations({fixed_label: outcomes[fixed_label], "hybrid": outcomes["hybrid"]})
        if row["hybrid"]["cold_starts"] > row[fixed_label]["cold_starts"]
    ]
    target = {
        "cold_starts_at_most_0.5x": ratios["cold_starts"] is not None and ratios["cold_starts"] <= 0.5,
        "idle_at_most_1.0x": ratios["idle_instance_s"] is not None and ratios["idle_instance_s"] <= 1.0,
        "groups_with_more_cold_starts": groups_worse,
    }
    total_s = time.perf_counter() - started
    report: dict[str, Any] = {
        "scenario": "keepalive_sim",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {k: v for k, v in machine_facts("").items() if k != "kafka"},
        "inputs": {
            "data": str(args.data),
            "sample": args.sample,
            "functions": len(traces),
            "minutes": args.minutes,
            "seed": args.seed,
            "prewarm_load_s": args.prewarm_load_s,
            "fixed": {"keep_alive_s": fixed.keep_alive_s},
            "hybrid": {
                "range_s": hybrid.range_s,
                "bin_s": hybrid.bin_s,
                "head_pct": hybrid.head_pct,
                "tail_pct": hybrid.tail_pct,
                "margin": hybrid.margin,
                "tail_margin": hybrid.tail_margin,
                "fallback_keep_alive_s": hybrid.fallback_keep_alive_s,
                "min_samples": hybrid.min_samples,
                "min_cv": hybrid.min_cv,
                "max_out_of_bounds_share": hybrid.max_out_of_bounds_share,
                "forecast": hybrid.forecast,
                "forecast_margin": hybrid.forecast_margin,
                "floor_no_prewarm": hybrid.floor_no_prewarm,
                "cold_start_cost_s": hybrid.cold_start_cost_s,
                "alternative_head_pcts": list(hybrid.alternative_head_pcts),
                "alternative_tail_pcts": list(hybrid.alternative_tail_pcts),
            },
        },
        "policies": figures,
        "hybrid_over_fixed": ratios,
        "target": target,
        "by_invocations": by_invocations(outcomes),
        "runtime_s": {
            "load": round(load_s, 3),
            **{k: round(v, 3) for k, v in took.items()},
            "total": round(total_s, 3),
        },
    }

    table = Table(
        "measure",
        fixed_label,
        "hybrid",
        "hybrid / fixed",
        title=f"Keep-alive on the Azure Functions sample ({args.sample}_inv.csv: {len(traces)} functions, "
        f"{args.minutes} min)",
    )

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:,}" if isinstance(v, int) else f"{v:,.2f}"

    for label, key in (
        ("invocations", "invocations"),
        ("cold starts", "cold_starts"),
        ("cold-start share %", "cold_start_pct"),
        ("per-function cold-start % p50", "per_function_cold_start_pct_p50"),
        ("per-function cold-start % p75", "per_function_cold_start_pct_p75"),
        ("idle instance-seconds", "idle_instance_s"),
    ):
        table.add_row(label, cell(f[key]), cell(h[key]), cell(_ratio(h[key], f[key])))
    table.add_row("idle instance-hours", cell(f["idle_instance_s"] / 3600), cell(h["idle_instance_s"] / 3600), "")
    console.print(table)
    groups = Table(
        "invocations",
        "functions",
        "cold, fixed",
        "cold, hybrid",
        "idle h, fixed",
        "idle h, hybrid",
        title="Functions grouped by invocations in the window (cold starts, idle instance-hours)",
    )
    for row in report["by_invocations"]:
        fr, hr = row[fixed_label], row["hybrid"]
        groups.add_row(
            row["invocations"],
            cell(row["functions"]),
            cell(fr["cold_starts"]),
            cell(hr["cold_starts"]),
            cell(fr["idle_instance_s"] / 3600),
            cell(hr["idle_instance_s"] / 3600),
        )
    console.print(groups)
    console.print(f"hybrid decisions after the last invocation, by kind: {h['final_decisions']}")
    if len(policies) > 2:
        pareto = Table(
            "policy", "cold-start share %", "cold / fixed", "idle instance-h", "idle / fixed", title="Pareto"
        )
        for label, fig in figures.items():
            pareto.add_row(
                label,
                cell(fig["cold_start_pct"]),
                cell(_ratio(fig["cold_starts"], f["cold_starts"])),
                cell(fig["idle_instance_s"] / 3600),
                cell(_ratio(fig["idle_instance_s"], f["idle_instance_s"])),
            )
        console.print(pareto)
    console.print(
        f"target (<= 0.5x cold starts at <= 1.0x idle of {fixed_label}, no group worse): "
        f"cold {cell(ratios['cold_starts'])}x, idle {cell(ratios['idle_instance_s'])}x, "
        f"groups with more cold starts: {groups_worse or 'none'}"
    )
    console.print(
        f"runtime: load {load_s:.2f}s, arrivals {took['arrivals']:.2f}s, "
        + ", ".join(f"{label} {took[label]:.2f}s" for label in policies)
        + f", total {total_s:.2f}s"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"keepalive-{stamp}.json"
    if not args.no_plot and len(policies) > 2:
        png = plots.keepalive_pareto(
            {label: (fig["cold_start_pct"] or 0.0, fig["idle_instance_s"]) for label, fig in figures.items()},
            args.out / f"keepalive-{stamp}-pareto.png",
            f"Keep-alive on the Azure Functions sample ({args.sample}_inv.csv, {len(traces)} functions, "
            f"{args.minutes} min)",
        )
        report["plots"] = [png.name] if png else []
        if png:
            console.print(f"plot {png}")
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    console.print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
