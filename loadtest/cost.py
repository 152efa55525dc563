"""CPU cost of one invocation, per component: where the cores go under load.

    python -m loadtest cost [--rate 200] [--seconds 15] [--systems direct,stoker]

For each system (the direct consumer, then Stoker on the same broker), invocations of the no-op
function arrive open-loop at ``--rate`` for ``--seconds``; the CPU time (``/proc/<pid>/stat``) of
every platform process, of this benchmark's own process (the client) and of its children (the
direct consumer) is read before and after the step. Each component's figure is milliseconds of CPU
per answered invocation. On a 2-core machine the sum is what caps throughput: at ``c`` ms per
invocation, nothing sustains more than ``2000 / c`` invocations per second.

The idle platform's own burn over the same window is subtracted from nothing: at a few % of a core
it is ~0.2 ms per invocation at 200/s; run ``loadtest idle`` for it. The system measured first on a
freshly started broker also pays for the broker's JIT compiler warming up: compare the components
other than the broker, or run each system on its own (``--systems``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

from rich.table import Table

from loadtest import harness
from loadtest.direct import direct_consumer
from loadtest.floor import noop_code
from loadtest.harness import console, fmt
from loadtest.idle import Sampler
from loadtest.load import closed_loop, describe, kafka_call, open_loop, schedule
from loadtest.warm import create_noop, delete
from services.common.client import StokerClient
from services.common.settings import CommonSettings


async def step(settings: CommonSettings, function: str, run_dir: Path, rate: float, seconds: float) -> dict[str, Any]:
    async with StokerClient(settings) as client:
        call = kafka_call(client, function, timeout_s=30.0)
        await closed_loop(call, 200, 16)  # instances and connections ready before the window
        # The platform's components, this process (the client) and its children (a direct consumer).
        sampler = Sampler(run_dir, {"client": os.getpid()})
        sampler.sample()
        started = time.monotonic()
        samples, _ = await open_loop(call, schedule(rate, seconds))
        sampler.sample()
        took = time.monotonic() - started
    answered = describe(samples, took)
    n = max(1, sum(1 for s in samples if s.ok))
    # % of one core over ``took`` seconds -> CPU milliseconds per answered invocation.
    per = {name: round(entry["pct"] * took * 10 / n, 3) for name, entry in sampler.per_component(took).items()}
    return {
        "rate": rate,
        "seconds": round(took, 2),
        "answered_ok": n,
        "latency_ms": answered.get("latency_ms"),
        "cpu_ms_per_invocation": dict(sorted(per.items(), key=lambda kv: -kv[1])),
        "total_cpu_ms_per_invocation": round(sum(per.values()), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="offered invocations per second")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of the measured step")
    parser.add_argument("--systems", default="direct,stoker", help="which to measure: direct, stoker")
    harness.add_common_args(parser)
    args = parser.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    report = harness.new_report(
        "cost", args, {"rate": args.rate, "seconds": args.seconds, "systems": systems, "function": "no-op"}
    )
    runs: dict[str, dict[str, Any]] = {}
    with harness.target(args, None) as where:
        report["platform"] = where.describe()
        run_dir = where.settings.run_dir
        if "direct" in systems:
            with noop_code() as code, direct_consumer(where.settings, code) as direct:
                runs["direct consumer"] = asyncio.run(step(direct, "noop", run_dir, args.rate, args.seconds))
        if "stoker" in systems:
            name = f"bench-cost-{uuid.uuid4().hex[:6]}"
            asyncio.run(create_noop(where, name))
            try:
                time.sleep(0.5)
                runs["Stoker"] = asyncio.run(step(where.settings, name, run_dir, args.rate, args.seconds))
            finally:
                asyncio.run(delete(where, name))
    report["runs"] = runs
    components = sorted({c for r in runs.values() for c in r["cpu_ms_per_invocation"]})
    table = Table("component", *runs, title=f"CPU ms per invocation at {args.rate:g}/s")
    for c in components:
        table.add_row(c, *(fmt(r["cpu_ms_per_invocation"].get(c)) for r in runs.values()))
    table.add_row("[bold]total[/bold]", *(fmt(r["total_cpu_ms_per_invocation"]) for r in runs.values()))
    table.add_row(
        "p50 / p99 ms",
        *(f"{fmt(r['latency_ms'].get('p50'))} / {fmt(r['latency_ms'].get('p99'))}" for r in runs.values()),
    )
    console.print(table)
    harness.save(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
