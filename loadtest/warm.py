"""Warm invocations of a no-op function through Stoker, next to the direct consumer on the same broker.

    python -m loadtest warm [--n 1000] [--concurrent 2000] [--concurrency 8] [--http-n 500]

Four paths, each sequential (one caller) and concurrent (``--concurrency`` callers, closed loop):
- **direct consumer** (``loadtest.direct``): the floor, 2 Kafka hops, run in this session on the
  platform's broker;
- **Stoker over Kafka**: ``StokerClient.invoke`` (publish to ``invocation``, wait on ``result``);
- **Stoker over HTTP**: ``POST /fn/NAME`` on the gateway with httpx (one keep-alive connection per
  caller).
Latency percentiles (p50/p90/p99/p99.9), throughput, start kinds and the platform's own
queue/start/exec split. Targets: Stoker p50 <= 2x the direct consumer's, p99 <= 3x.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from functools import partial
from typing import Any

import httpx
from rich.table import Table

from loadtest import harness, plots
from loadtest.floor import WARMUP, closed_runs, direct_runs, latency_table, row
from loadtest.harness import Target, console, fmt
from loadtest.load import closed_loop, describe, http_call
from loadtest.spine import deploy_noop
from loadtest.stats import ratio
from services.common.client import StokerClient

TARGET_P50 = 2.0
TARGET_P99 = 3.0


async def http_runs(where: Target, function: str, sequential: int, concurrent: int, concurrency: int) -> dict[str, Any]:
    """Sequential then concurrent ``POST /fn/NAME``; every caller has its own connection."""
    out: dict[str, Any] = {}
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    async with httpx.AsyncClient(
        base_url=where.http, timeout=30, limits=limits, headers=where.auth_headers
    ) as http:
        call = http_call(http, function)
        await closed_loop(call, WARMUP, 1)
        await closed_loop(call, concurrency * 4, concurrency)
        with harness.progress() as bars:
            for mode, n, c in (("sequential", sequential, 1), ("concurrent", concurrent, concurrency)):
                if n <= 0:
                    continue
                task = bars.add_task(f"Stoker over HTTP: {mode} (x{c})", total=n)
                samples, wall = await closed_loop(call, n, c, partial(bars.advance, task))
                out[mode] = {**describe(samples, wall), "concurrency": c}
                out[mode]["samples_ms"] = [round(s.latency_ms, 3) for s in samples if s.ok]
    return out


async def create_noop(where: Target, name: str) -> None:
    async with StokerClient(where.settings) as client:
        await deploy_noop(client, where.settings, name, f"warm {name}")


async def delete(where: Target, name: str) -> None:
    async with StokerClient(where.settings) as client:
        await client.delete_function(name)


def comparisons(report: dict[str, Any]) -> dict[str, Any]:
    """Stoker over the direct consumer, per mode: the ratios the targets are about."""
    out: dict[str, Any] = {}
    for mode in ("sequential", "concurrent"):
        direct = report["direct"].get(mode, {}).get("latency_ms", {})
        for path in ("kafka", "http"):
            stoker = report["stoker"][path].get(mode, {}).get("latency_ms", {})
            out[f"{path}_{mode}"] = {
                "p50_ratio": ratio(stoker.get("p50"), direct.get("p50")),
                "p99_ratio": ratio(stoker.get("p99"), direct.get("p99")),
                "p50_added_ms": round(stoker["p50"] - direct["p50"], 3)
                if stoker.get("n") and direct.get("n")
                else None,
            }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="sequential invocations per path")
    parser.add_argument("--concurrent", type=int, default=2000, help="concurrent invocations per path")
    parser.add_argument("--concurrency", type=int, default=8, help="callers of the concurrent runs")
    parser.add_argument("--http-n", type=int, default=None, help="sequential HTTP invocations (default --n)")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP path")
    harness.add_common_args(parser)
    args = parser.parse_args(argv)
    http_n = args.n if args.http_n is None else args.http_n
    report = harness.new_report(
        "warm",
        args,
        {
            "n": args.n,
            "concurrent": args.concurrent,
            "concurrency": args.concurrency,
            "http_n": 0 if args.no_http else http_n,
            "function": "no-op (loadtest.spine.NOOP), reuse keep",
        },
    )
    name = f"bench-warm-{uuid.uuid4().hex[:6]}"
    with harness.target(args) as where:
        report["platform"] = where.describe()
        asyncio.run(create_noop(where, name))
        try:
            # The floor first, then Stoker, on the same broker in the same session.
            report["direct"] = direct_runs(where.settings, args.n, args.concurrent, args.concurrency)
            report["stoker"] = {
                "kafka": asyncio.run(
                    closed_runs(where.settings, name, args.n, args.concurrent, args.concurrency, "Stoker over Kafka")
                )
            }
            report["stoker"]["http"] = (
                {} if args.no_http else asyncio.run(http_runs(where, name, http_n, args.concurrent, args.concurrency))
            )
        finally:
            asyncio.run(delete(where, name))
    report["comparison"] = comparisons(report)
    table = latency_table("Warm invocations of a no-op function (latency as the client sees it)")
    for mode in ("sequential", "concurrent"):
        for label, figures in (
            ("direct consumer (floor, 2 hops)", report["direct"].get(mode)),
            ("Stoker over Kafka (StokerClient)", report["stoker"]["kafka"].get(mode)),
            ("Stoker over HTTP (POST /fn)", report["stoker"]["http"].get(mode)),
        ):
            if figures:
                row(table, f"{label}, {mode} x{figures['concurrency']}", figures)
    console.print(table)
    verdicts = Table("Stoker vs direct consumer", "p50 ratio", "p99 ratio", "p50 added ms", title="Ratios")
    for key, c in report["comparison"].items():
        verdicts.add_row(key, fmt(c["p50_ratio"]), fmt(c["p99_ratio"]), fmt(c["p50_added_ms"]))
    console.print(verdicts)
    seq = report["comparison"]["kafka_sequential"]
    console.print(
        f"target: warm p50 <= {TARGET_P50:g}x direct -> {fmt(seq['p50_ratio'])}x; "
        f"p99 <= {TARGET_P99:g}x -> {fmt(seq['p99_ratio'])}x"
    )
    split = report["stoker"]["kafka"].get("sequential", {}).get("platform_split_ms", {})
    if split:
        console.print(
            "Stoker's own split (sequential, p50 ms): "
            + ", ".join(f"{k} {v.get('p50')}" for k, v in split.items())
            + "  (queue = request timestamp -> instance chosen on a node: client->dispatcher->agent)"
        )
    if not args.no_plot:
        written = []
        for mode in ("sequential", "concurrent"):
            png = plots.latency_cdf(
                {
                    "direct consumer": report["direct"].get(mode, {}).get("samples_ms", []),
                    "Stoker over Kafka": report["stoker"]["kafka"].get(mode, {}).get("samples_ms", []),
                    "Stoker over HTTP": report["stoker"]["http"].get(mode, {}).get("samples_ms", []),
                },
                harness.plot_path(args.out, "warm", mode),
                f"Warm no-op invocations, {mode} (x{1 if mode == 'sequential' else args.concurrency})",
            )
            if png:
                written.append(png.name)
        report["plots"] = written
    harness.save(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
