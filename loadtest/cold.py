"""The first invocation per start kind, end to end, next to a plain ``python -c`` of the same code.

    python -m loadtest cold [--reps 20] [--variants light,heavy] [--kinds warm,prewarmed,pool,zygote,spawn]

Per start kind, ``--reps`` new functions (new code, new digest) each invoked once through
``StokerClient``; the client-observed latency and the agent's own ``start`` phase are reported:
- **warm**: a function already run once on its instance (the reference for *prewarmed*);
- **prewarmed**: loaded into an instance ahead of demand (``PrewarmRequested``, as a commit or the
  keep-alive policy would), invoked once the prewarm completed and a heartbeat shows the instance;
- **pool**: a generic pool instance specialized on the request;
- **zygote** / **spawn**: no pool (pool size 0), forked from the zygote / a new interpreter.
Three platforms are started for this (pool size 2; pool size 0; pool size 0 without zygote), as
``loadtest.starts`` does; against a running platform (``--bootstrap``) only warm, prewarmed and
pool are measured. ``python -c``: the wall time of a new interpreter importing and running the
code (``loadtest.starts.python_c``). Every measured call, warm ones included, comes after 0.3 s
without a call, and each prewarmed call is paired with a warm call of the same function 0.3 s
later. Target: prewarmed and warm p50 within 1 ms of each other.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from rich.table import Table

from events import NodeHeartbeat, NodeStopped, PrewarmCompleted, PrewarmRequested
from events.placement import ROLE
from loadtest import harness, plots
from loadtest.harness import Target, console, fmt
from loadtest.starts import CODE, new_function, python_c
from loadtest.stats import latency_summary
from services.common import views
from services.common.client import StokerClient

KINDS = ("warm", "prewarmed", "pool", "zygote", "spawn")
PHASES: tuple[tuple[dict[str, str], tuple[str, ...], tuple[str, ...]], ...] = (
    ({"STOKER_POOL_SIZE": "2"}, ("warm", "prewarmed", "pool"), ("--pool-size", "2")),
    ({"STOKER_POOL_SIZE": "0"}, ("zygote",), ("--pool-size", "0")),
    ({"STOKER_POOL_SIZE": "0", "STOKER_ZYGOTE": "off"}, ("spawn",), ("--pool-size", "0")),
)
SPEC_SETTLE_S = 0.3
"""A new function's spec is this old when it is first invoked (as when created ahead of its first request)."""
QUIET_S = 0.3
"""Every measured call comes after at least this long without one, warm calls included: a call right
behind another shares the platform with the previous call's tail (its offset commits, its result)."""
TARGET_PREWARMED_MS = 1.0
WARMUP = 20


def runtime_beats(nodes: views.Table[Any]) -> list[NodeHeartbeat]:
    """The latest heartbeat of every runtime node (isolation nodes keep no generic pool)."""
    return [
        b for b in nodes.rows.values() if isinstance(b, NodeHeartbeat) and b.labels.get(ROLE, "runtime") == "runtime"
    ]


async def wait_until(check: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def generic_everywhere(nodes: views.Table[Any]) -> Callable[[], bool]:
    """Every runtime node reports a generic instance: the pool refilled after the last first invocation."""

    def check() -> bool:
        beats = runtime_beats(nodes)
        return bool(beats) and all(any(i.state == "generic" for i in b.instances) for b in beats)

    return check


def loaded(nodes: views.Table[Any], name: str) -> Callable[[], bool]:
    """A heartbeat shows a ready instance of ``name``: the dispatcher can route to it."""

    def check() -> bool:
        return any(i.function == name and i.state == "ready" for b in runtime_beats(nodes) for i in b.instances)

    return check


async def measure(
    where: Target, kinds: tuple[str, ...], variants: list[str], reps: int, advance: Callable[[], None]
) -> dict[str, Any]:
    """Per variant and kind: end-to-end latencies, start phases, and first invocations that got another kind."""
    settings = where.settings
    out: dict[str, Any] = {}
    done: dict[str, PrewarmCompleted] = {}
    async with StokerClient(settings) as client:
        tail = client.reader.tail(
            settings.topics.prewarm, (PrewarmCompleted,), lambda e: done.__setitem__(e.function, e)
        )
        nodes: views.Table[Any] = client.reader.table(settings.topics.node, (NodeHeartbeat, NodeStopped), traced=False)
        await asyncio.gather(tail.start(), nodes.start())
        for variant in variants:
            figures: dict[str, Any] = {}
            for kind in kinds:
                e2e: list[float] = []
                start: list[float] = []
                other: dict[str, int] = {}
                paired: list[float] = []
                differences: list[float] = []
                if kind == "warm":
                    name = await new_function(client, settings, variant)
                    for _ in range(WARMUP):  # the platform just started: its services settle first
                        await client.invoke(name, None, timeout_s=60)
                for _ in range(reps):
                    if kind == "warm":
                        await asyncio.sleep(QUIET_S)
                    else:
                        if kind == "pool":
                            await wait_until(generic_everywhere(nodes), 10)
                        name = await new_function(client, settings, variant)
                        if kind == "prewarmed":
                            await client.send(PrewarmRequested(function=name, count=1), settings.topics.prewarm, name)
                            await wait_until(partial(dict.__contains__, done, name), 30)
                            await wait_until(loaded(nodes, name), 10)  # a few heartbeats (2 s apart)
                        else:
                            await asyncio.sleep(SPEC_SETTLE_S)
                    began = time.perf_counter()
                    result = await client.invoke(name, None, timeout_s=60)
                    took = (time.perf_counter() - began) * 1000
                    if result.status != "ok":
                        other[f"status {result.status}"] = other.get(f"status {result.status}", 0) + 1
                    elif result.start != kind:
                        other[result.start or "?"] = other.get(result.start or "?", 0) + 1
                    else:
                        e2e.append(took)
                        start.append(result.timings_ms.start)
                        if kind == "prewarmed":
                            # The same function again, now warm on the same instance, after the
                            # same quiet time: a pair measured under the same conditions.
                            await asyncio.sleep(QUIET_S)
                            began = time.perf_counter()
                            again = await client.invoke(name, None, timeout_s=60)
                            if again.status == "ok" and again.start == "warm":
                                paired.append((time.perf_counter() - began) * 1000)
                                differences.append(took - paired[-1])
                    if kind != "warm":
                        await client.delete_function(name)
                    advance()
                figures[kind] = {
                    "end_to_end_ms": latency_summary(e2e),
                    "start_phase_ms": latency_summary(start),
                    "got_another_kind": other,
                    "samples_ms": [round(x, 3) for x in e2e],
                }
                if paired:
                    figures[kind]["paired_warm_end_to_end_ms"] = latency_summary(paired)
                    figures[kind]["paired_difference_ms"] = latency_summary(differences)
            out[variant] = figures
    return out


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("stoker.table").setLevel(logging.ERROR)  # the prewarm topic also holds requests
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20, help="first invocations per start kind")
    parser.add_argument("--variants", default="light", help=f"code variants, of {','.join(CODE)}")
    parser.add_argument("--kinds", default=",".join(KINDS), help="start kinds to measure")
    harness.add_common_args(parser)
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if unknown := [v for v in variants if v not in CODE] + [k for k in kinds if k not in KINDS]:
        parser.error(f"unknown variants or kinds: {unknown}")
    report = harness.new_report(
        "cold",
        args,
        {
            "reps": args.reps,
            "variants": variants,
            "kinds": list(kinds),
            "code": {v: CODE[v] for v in variants},
            "spec_settle_s": SPEC_SETTLE_S,
        },
    )
    phases = [(env, tuple(k for k in ks if k in kinds), up) for env, ks, up in PHASES]
    if harness.wants_running(args):
        phases = [(env, ks, up) for env, ks, up in phases[:1]]
    phases = [p for p in phases if p[1]]
    figures: dict[str, dict[str, Any]] = {v: {} for v in variants}
    report["platforms"] = []
    total = sum(len(ks) for _, ks, _ in phases) * len(variants) * args.reps + len(variants) * args.reps
    with harness.progress() as bars:
        task = bars.add_task("first invocations", total=total)
        for env, ks, up in phases:
            bars.update(task, description=f"first invocations: {', '.join(ks)}")
            with harness.target(args, env, *up) as where:
                report["platforms"].append({"kinds": list(ks), **where.describe()})
                measured = asyncio.run(measure(where, ks, variants, args.reps, lambda: bars.advance(task)))
            for variant, by_kind in measured.items():
                figures[variant].update(by_kind)
        bars.update(task, description="python -c")
        for variant in variants:
            samples = python_c(CODE[variant], args.reps)
            figures[variant]["python -c"] = {
                "end_to_end_ms": latency_summary(samples),
                "samples_ms": [round(x, 3) for x in samples],
            }
            bars.advance(task, args.reps)
    report["figures"] = figures
    comparison: dict[str, Any] = {}
    for variant, by_kind in figures.items():
        warm = by_kind.get("warm", {}).get("end_to_end_ms", {}).get("p50")
        pre = by_kind.get("prewarmed", {}).get("end_to_end_ms", {}).get("p50")
        pairs = by_kind.get("prewarmed", {}).get("paired_difference_ms", {})
        comparison[variant] = {
            "prewarmed_minus_warm_p50_ms": round(pre - warm, 3) if warm is not None and pre is not None else None,
            "paired_difference_p50_ms": pairs.get("p50"),
            "pairs": pairs.get("n", 0),
        }
    report["comparison"] = comparison
    table = Table(
        "code",
        "start kind",
        "n",
        "end-to-end p50 ms",
        "p90",
        "p99",
        "max",
        "start phase p50 ms",
        "other kinds seen",
        title="First invocation per start kind (client-observed), next to python -c",
    )
    for variant, by_kind in figures.items():
        for kind, f in by_kind.items():
            s = f["end_to_end_ms"]
            table.add_row(
                variant,
                kind,
                fmt(s.get("n")),
                fmt(s.get("p50")),
                fmt(s.get("p90")),
                fmt(s.get("p99")),
                fmt(s.get("max")),
                fmt(f.get("start_phase_ms", {}).get("p50")),
                str(f.get("got_another_kind") or ""),
            )
    console.print(table)
    for variant, c in comparison.items():
        console.print(
            f"{variant}: prewarmed p50 - warm p50 = {fmt(c['prewarmed_minus_warm_p50_ms'])} ms; "
            f"median of {c['pairs']} paired differences (prewarmed call - the warm call right after it) = "
            f"{fmt(c['paired_difference_p50_ms'])} ms (target: within {TARGET_PREWARMED_MS:g} ms)"
        )
    if not args.no_plot:
        report["plots"] = [
            png.name
            for variant, by_kind in figures.items()
            if (
                png := plots.boxes(
                    {k: f["samples_ms"] for k, f in by_kind.items()},
                    harness.plot_path(args.out, "cold", variant),
                    f"First invocation per start kind ({variant} code), client-observed",
                )
            )
        ]
    harness.save(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
