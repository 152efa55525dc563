"""Open-loop load at increasing rates until latency or errors break, for Stoker and the direct consumer.

    python -m loadtest throughput [--rates 25,50,...,3200,4800,6400] [--dispatchers N]
                                  [--step-s 5] [--p99-limit-ms 250]

For each system (the direct consumer first, then Stoker over Kafka with ``StokerClient``, on the
same broker), invocations of the no-op function arrive at a fixed rate for ``--step-s`` seconds
(open loop: each is sent when due, whether or not earlier ones have answered; latency counts from
the due time). The rate goes up step by step until a step *breaks*: more than 1% errors or
answers missing, p99 over ``--p99-limit-ms``, or fewer than 90% answered within the step (plus the
p99 limit); a broken step is run once more, and only a second break counts (one stall of a shared
machine must not end the ramp). Then one step halfway between the last good rate and the broken
one refines the edge.
*Sustained throughput* is the highest answered rate of a step that did not break. Target: Stoker's
>= 0.5x the direct consumer's.

The generator shares the machine with what it measures; ``send_lag`` (how late it sent) says when
the generator itself could not keep up.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

from rich.table import Table

from loadtest import harness, plots
from loadtest.direct import direct_consumer
from loadtest.floor import noop_code
from loadtest.harness import console, fmt
from loadtest.load import Breaking, closed_loop, judge_step, kafka_call, open_loop, schedule
from loadtest.stats import ratio
from loadtest.warm import create_noop, delete
from services.common.client import StokerClient
from services.common.settings import CommonSettings

TARGET_RATIO = 0.5
PAUSE_S = 1.0
"""Quiet time between steps, after the last answer of the previous one."""


def next_rates(rates: list[float], results: list[dict[str, Any]], refine: bool) -> float | None:
    """The next rate to try: the next of ``rates`` while steps hold, then one halfway refinement."""
    if not results:
        return rates[0] if rates else None
    last = results[-1]
    good = [r["offered_per_s"] for r in results if not r["broken"]]
    broken = [r["offered_per_s"] for r in results if r["broken"]]
    if not broken:
        later = [r for r in rates if r > last["offered_per_s"]]
        return later[0] if later else None
    if refine and len(broken) == 1 and last["broken"]:
        low = max(good) if good else 0.0
        mid = round((low + broken[0]) / 2, 1)
        return mid if mid > low and mid not in good else None
    return None


def sustained(results: list[dict[str, Any]]) -> float | None:
    """The highest answered rate of a step that did not break."""
    held = [r["achieved_per_s"] for r in results if not r["broken"] and not r.get("repeated")]
    return max(held) if held else None


async def ramp(
    settings: CommonSettings, function: str, rates: list[float], step_s: float, rule: Breaking, label: str
) -> list[dict[str, Any]]:
    """Open-loop steps at increasing rates against one system until one breaks (and one refinement)."""
    results: list[dict[str, Any]] = []
    async with StokerClient(settings) as client:
        call = kafka_call(client, function, timeout_s=30.0)
        await closed_loop(call, 20, 1)
        await closed_loop(call, 200, 16)  # instances and connections for the concurrency to come
        with harness.progress() as bars:
            task = bars.add_task(label, total=None)
            while (rate := next_rates(rates, [r for r in results if not r.get("repeated")], refine=True)) is not None:
                for attempt in (1, 2):
                    due = schedule(rate, step_s)
                    bars.update(task, description=f"{label}: {rate:g}/s for {step_s:g}s", total=len(due), completed=0)
                    samples, _ = await open_loop(call, due, lambda: bars.advance(task))
                    step = judge_step(samples, rate, step_s, rule)
                    results.append(step)
                    verdict = f"broken: {step['why']}" if step["broken"] else "held"
                    console.print(
                        f"  {label} {rate:g}/s: answered {step['achieved_per_s']}/s, p50 "
                        f"{step['latency_ms'].get('p50')} ms, p99 {step['latency_ms'].get('p99')} ms, "
                        f"send lag p99 {step['send_lag_ms'].get('p99')} ms -> {verdict}"
                    )
                    await asyncio.sleep(PAUSE_S)
                    if not step["broken"] or attempt == 2:
                        break
                    # A step breaks only if it breaks twice: on a shared 2-core machine one stall
                    # (another process, a GC pause) must not end the ramp.
                    step["repeated"] = True
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rates",
        default="25,50,75,100,150,200,300,400,600,800,1200,1600,2400,3200,4800,6400",
        help="offered rates to step through, /s",
    )
    parser.add_argument("--step-s", type=float, default=5.0, help="seconds per rate")
    parser.add_argument("--p99-limit-ms", type=float, default=250.0, help="a step with a higher p99 is broken")
    parser.add_argument("--max-error-share", type=float, default=0.01)
    parser.add_argument("--systems", default="direct,stoker", help="which to measure: direct, stoker")
    parser.add_argument("--dispatchers", type=int, default=1, help="dispatcher processes of the platform it starts")
    harness.add_common_args(parser)
    args = parser.parse_args(argv)
    rates = sorted(float(r) for r in args.rates.split(",") if r)
    systems = [s for s in args.systems.split(",") if s]
    rule = Breaking(max_error_share=args.max_error_share, p99_limit_ms=args.p99_limit_ms)
    report = harness.new_report(
        "throughput",
        args,
        {
            "rates": rates,
            "step_s": args.step_s,
            "breaking": {
                "max_error_share": rule.max_error_share,
                "p99_limit_ms": rule.p99_limit_ms,
                "min_answered_share": rule.min_achieved_share,
            },
            "systems": systems,
            "dispatchers": args.dispatchers,
            "function": "no-op (loadtest.spine.NOOP), reuse keep",
            "path": "Kafka, StokerClient.invoke (open loop, one client process)",
        },
    )
    runs: dict[str, list[dict[str, Any]]] = {}
    name = f"bench-tput-{uuid.uuid4().hex[:6]}"
    with harness.target(args, None, "--dispatchers", str(args.dispatchers)) as where:
        report["platform"] = where.describe()
        if "direct" in systems:
            with noop_code() as code, direct_consumer(where.settings, code) as direct:
                runs["direct consumer"] = asyncio.run(ramp(direct, "noop", rates, args.step_s, rule, "direct"))
        if "stoker" in systems:
            asyncio.run(create_noop(where, name))
            try:
                time.sleep(0.5)
                runs["Stoker"] = asyncio.run(ramp(where.settings, name, rates, args.step_s, rule, "Stoker"))
            finally:
                asyncio.run(delete(where, name))
    report["steps"] = runs
    report["sustained_per_s"] = {label: sustained(steps) for label, steps in runs.items()}
    # A system that held the highest rate offered was not pushed to its limit: its figure is a floor.
    report["held_every_rate"] = {
        label: bool(steps) and not any(s["broken"] and not s.get("repeated") for s in steps)
        for label, steps in runs.items()
    }
    report["stoker_over_direct"] = ratio(
        report["sustained_per_s"].get("Stoker"), report["sustained_per_s"].get("direct consumer")
    )
    table = Table(
        "system",
        "offered /s",
        "answered /s",
        "p50 ms",
        "p99 ms",
        "errors",
        "send lag p99 ms",
        "verdict",
        title="Open-loop throughput (latency from the due time)",
    )
    for label, steps in runs.items():
        for s in steps:
            table.add_row(
                label,
                fmt(s["offered_per_s"], 0),
                fmt(s["achieved_per_s"], 0),
                fmt(s["latency_ms"].get("p50")),
                fmt(s["latency_ms"].get("p99")),
                fmt(s["errors"]),
                fmt(s["send_lag_ms"].get("p99")),
                ("repeated, " if s.get("repeated") else "") + (f"broken: {s['why']}" if s["broken"] else "held"),
            )
    console.print(table)
    console.print(
        "sustained: "
        + ", ".join(
            f"{k} {'>= ' if report['held_every_rate'][k] else ''}{fmt(v, 0)}/s"
            for k, v in report["sustained_per_s"].items()
        )
        + f"; Stoker / direct = {fmt(report['stoker_over_direct'])} (target >= {TARGET_RATIO:g})"
    )
    if not args.no_plot:
        png = plots.throughput_curves(
            runs, harness.plot_path(args.out, "throughput", "curves"), "Open-loop throughput: Stoker vs direct consumer"
        )
        report["plots"] = [png.name] if png else []
    harness.save(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
