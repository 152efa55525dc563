"""The floor: what one Kafka hop and a minimal Kafka-mediated execution cost on this broker.

    python -m loadtest floor [--bare 1000] [--direct 1000] [--concurrent 2000] [--concurrency 8]

- **bare Kafka produce->consume (1 hop)**: one aiokafka producer with the platform's settings and
  one consumer (``loadtest.spine.bare_round_trip``).
- **direct consumer (2 hops)**: the no-op function Stoker benchmarks run, called in-process by one
  consumer process that produces its result (``loadtest.direct``), invoked with ``StokerClient``
  exactly as Stoker is: sequentially, then by ``--concurrency`` concurrent callers.

Nothing can execute a function through Kafka for less than the direct consumer; the other
scenarios put Stoker next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from rich.table import Table

from loadtest import harness, plots
from loadtest.direct import direct_consumer
from loadtest.harness import console, fmt
from loadtest.load import closed_loop, describe, kafka_call
from loadtest.spine import NOOP, bare_round_trip
from loadtest.stats import latency_summary
from services.common.client import StokerClient
from services.common.settings import CommonSettings

WARMUP = 20


@contextmanager
def noop_code() -> Iterator[Path]:
    """A folder with the no-op function every latency scenario runs (``handler:main``)."""
    with tempfile.TemporaryDirectory(prefix="stoker-noop-") as tmp:
        Path(tmp, "handler.py").write_text(NOOP)
        yield Path(tmp)


async def closed_runs(
    settings: CommonSettings, function: str, sequential: int, concurrent: int, concurrency: int, label: str
) -> dict[str, Any]:
    """Sequential then concurrent closed-loop runs over Kafka with ``StokerClient`` on ``settings``."""
    out: dict[str, Any] = {}
    async with StokerClient(settings) as client:
        call = kafka_call(client, function)
        await closed_loop(call, WARMUP, 1)
        await closed_loop(call, concurrency * 4, concurrency)  # connections, instances, caches
        with harness.progress() as bars:
            for mode, n, c in (("sequential", sequential, 1), ("concurrent", concurrent, concurrency)):
                if n <= 0:
                    continue
                task = bars.add_task(f"{label}: {mode} (x{c})", total=n)
                samples, wall = await closed_loop(call, n, c, partial(bars.advance, task))
                out[mode] = {**describe(samples, wall), "concurrency": c}
                out[mode]["samples_ms"] = [round(s.latency_ms, 3) for s in samples if s.ok]
    return out


def direct_runs(settings: CommonSettings, sequential: int, concurrent: int, concurrency: int) -> dict[str, Any]:
    """The direct consumer on ``settings``' broker, measured like Stoker (see :func:`closed_runs`)."""
    with noop_code() as code, direct_consumer(settings, code) as direct:
        return asyncio.run(closed_runs(direct, "noop", sequential, concurrent, concurrency, "direct consumer"))


def row(table: Table, label: str, figures: dict[str, Any]) -> None:
    s = figures.get("latency_ms", figures)
    table.add_row(
        label,
        fmt(s.get("n")),
        fmt(s.get("p50")),
        fmt(s.get("p90")),
        fmt(s.get("p99")),
        fmt(s.get("p99.9")),
        fmt(s.get("max")),
        fmt(figures.get("throughput_per_s"), 0),
    )


def latency_table(title: str) -> Table:
    return Table("measure", "n", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "per s", title=title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bare", type=int, default=1000, help="bare produce->consume round trips")
    parser.add_argument("--direct", type=int, default=1000, help="sequential direct-consumer invocations")
    parser.add_argument("--concurrent", type=int, default=2000, help="concurrent direct-consumer invocations")
    parser.add_argument("--concurrency", type=int, default=8, help="callers of the concurrent run")
    harness.add_common_args(parser)
    args = parser.parse_args(argv)
    report = harness.new_report(
        "floor",
        args,
        {"bare": args.bare, "direct": args.direct, "concurrent": args.concurrent, "concurrency": args.concurrency},
    )
    with harness.target(args) as where:
        report["platform"] = where.describe()
        bare = asyncio.run(bare_round_trip(where.settings, args.bare))
        direct = direct_runs(where.settings, args.direct, args.concurrent, args.concurrency)
    report["bare_kafka_round_trip_ms"] = latency_summary(bare)
    report["bare_samples_ms"] = [round(x, 3) for x in bare]
    report["direct"] = direct
    table = latency_table("The floor: Kafka on this broker, and the least a Kafka-mediated execution costs")
    row(table, "bare Kafka produce->consume (1 hop)", report["bare_kafka_round_trip_ms"])
    for mode, figures in direct.items():
        row(table, f"direct consumer, {mode} x{figures['concurrency']} (2 hops)", figures)
    console.print(table)
    if not args.no_plot:
        png = plots.latency_cdf(
            {
                "bare Kafka (1 hop)": bare,
                **{f"direct consumer {m} x{f['concurrency']}": f["samples_ms"] for m, f in direct.items()},
            },
            harness.plot_path(args.out, "floor", "latency"),
            "The floor: latency distribution",
        )
        report["plots"] = [png.name] if png else []
    harness.save(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
