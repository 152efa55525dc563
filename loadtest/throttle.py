"""Noisy-neighbour benchmark: each noisy shape next to a well-behaved function on one runtime node.

    python -m loadtest.throttle [--shapes spinner,spinners,grower,forker] [--rate 10]
                                [--phase-s 10] [--shape-s 20]

Starts a platform with one runtime node and one isolation node (``STOKER_THROTTLE_HOST_PRESSURE=on``:
its agents share this host, so the throttler reads the host's PSI / run queue as each node's). A
well-behaved function (``victim``: 3 ms of work) is invoked at a steady rate throughout. For each
shape in turn, after a baseline phase, a noisy function of its own starts on the same node:

- ``spinner``: one call spinning a core for the whole phase;
- ``spinners``: many short concurrent spinners (4 calls at a time, 1.5 s each, one after another);
- ``grower``: calls that grow to 200 MB (past the 128 MB normal bound, under the 256 MB limit) and hold;
- ``forker``: a call that keeps ~120 short-lived child processes going (its ``pids_limit`` raised to 512).

Reported per shape, in metric intervals (1 s) from when the shape shows (the first metric record
of ``stoker.node-metric`` in which the noisy function's instances together use 300m or more, or
hold 128 MB or more, or 64 pids or more): the first clamp (or, for memory, kill) and the
isolation, from the throttler's decisions on ``stoker.throttle`` (also from the shape's first
call, which includes its instance's start); the
victim's p99 before the shape, while it runs before isolation, and from 2 s after the isolation
to the end of the phase. Targets: clamp <= 2 intervals after the shape shows, isolation <= 5,
p99 after isolation <= 1.5x the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from events import FunctionSpec, NodeMetrics, ThrottleDecided
from loadtest.platform import own_platform, settings_of
from loadtest.stats import machine_facts, summary
from services.cli.broker import KAFKA_VERSION
from services.common.client import StokerClient, package_code
from services.common.settings import CommonSettings

console = Console()
SHAPES = ("spinner", "spinners", "grower", "forker")
VICTIM = """import time

def main(event):
    end = time.perf_counter() + 0.003  # a few milliseconds of honest work
    while time.perf_counter() < end:
        pass
    return 1
"""
SPIN = """import time

def main(event):
    end = time.time() + event['seconds']
    while time.time() < end:
        pass
    return 0
"""
GROW = """import time

def main(event):
    held = []
    for _ in range(8):  # 25 MB at a time up to 200 MB
        held.append(bytearray(25 * 2**20))
        time.sleep(0.1)
    time.sleep(event['seconds'])
    return len(held)
"""
FORK = """import os, time

def main(event):
    end = time.time() + event['seconds']
    children = set()
    while time.time() < end:
        while len(children) < 120:
            pid = os.fork()
            if pid == 0:
                time.sleep(0.3)
                os._exit(0)
            children.add(pid)
        pid, _ = os.waitpid(-1, 0)
        children.discard(pid)
    for pid in children:
        os.waitpid(pid, 0)
    return 0
"""
CODE = {"spinner": SPIN, "spinners": SPIN, "grower": GROW, "forker": FORK}


async def deploy(client: StokerClient, settings: CommonSettings, name: str, code: str, **fields: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "handler.py").write_text(code)
        source = package_code(settings, Path(tmp))
    await client.put_function(
        FunctionSpec(name=name, entrypoint="handler:main", source=source, timeout_s=120, concurrency=1000, **fields)
    )


async def noise(client: StokerClient, shape: str, name: str, seconds: float) -> None:
    """Run one shape for ``seconds``."""
    end = time.monotonic() + seconds
    if shape in ("spinner", "forker"):
        await client.invoke(name, {"seconds": seconds}, timeout_s=seconds + 60)
    elif shape == "spinners":

        async def lane() -> None:
            while time.monotonic() < end:
                await client.invoke(name, {"seconds": 1.5}, timeout_s=60)

        await asyncio.gather(*(lane() for _ in range(4)))
    else:  # grower: each call grows and holds until it is killed (or the phase ends)
        while (left := end - time.monotonic()) > 0.5:
            await client.invoke(name, {"seconds": left}, timeout_s=left + 60)


async def run_shape(
    client: StokerClient,
    settings: CommonSettings,
    shape: str,
    decided: list[tuple[float, ThrottleDecided]],
    metrics: list[tuple[float, NodeMetrics]],
    rate: float,
    phase_s: float,
    shape_s: float,
) -> dict[str, Any]:
    name = f"noisy-{shape}"
    await deploy(client, settings, name, CODE[shape], **({"pids_limit": 512} if shape == "forker" else {}))
    latencies: list[tuple[float, float, str]] = []

    async def one() -> None:
        sent = time.monotonic()
        result = await client.invoke("victim", None, timeout_s=60)
        latencies.append((sent, (time.monotonic() - sent) * 1000, result.status))

    started = time.monotonic()
    shape_started = started + phase_s
    noisy: asyncio.Task[None] | None = None
    tasks = []
    n = 0
    while time.monotonic() - started < phase_s + shape_s:
        if noisy is None and time.monotonic() >= shape_started:
            shape_started = time.monotonic()
            noisy = asyncio.create_task(noise(client, shape, name, shape_s))
        tasks.append(asyncio.create_task(one()))
        n += 1
        await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))  # open loop
    await asyncio.gather(*tasks)
    if noisy is not None:
        noisy.cancel()
        await asyncio.gather(noisy, return_exceptions=True)
    mine = [(t, d) for t, d in decided if d.function == name]
    first = next((t for t, d in mine if d.action in ("clamp", "kill")), None)
    isolate = next((t for t, d in mine if d.action == "isolate"), None)
    shows = next((t for t, m in metrics if t >= shape_started and _shows(m, name)), None)

    def since(t: float | None, start: float | None) -> float | None:
        return None if t is None or start is None else round(t - start, 2)

    isolated_at = isolate if isolate is not None else shape_started + shape_s
    phases = {
        "before": [ms for t, ms, _ in latencies if t < shape_started],
        "during": [ms for t, ms, _ in latencies if shape_started <= t < isolated_at],
        "after": [ms for t, ms, _ in latencies if t >= isolated_at + 2.0] if isolate is not None else [],
    }
    return {
        "shows_after_s": since(shows, shape_started),
        "intervals_to_clamp": since(first, shows),
        "intervals_to_isolation": since(isolate, shows),
        "seconds_from_first_call_to_clamp": since(first, shape_started),
        "seconds_from_first_call_to_isolation": since(isolate, shape_started),
        "decisions": [d.model_dump(mode="json") for _, d in mine],
        "victim_ms": {k: summary(v) for k, v in phases.items()},
        "victim_errors": sum(1 for _, _, s in latencies if s != "ok"),
    }


def _shows(record: NodeMetrics, function: str) -> bool:
    ms = [m for m in record.instances if m.function == function]
    return sum(m.cpu_millis for m in ms) >= 300 or sum(m.memory_mb for m in ms) >= 128 or sum(m.pids for m in ms) >= 64


async def run(
    settings: CommonSettings, shapes: list[str], rate: float, phase_s: float, shape_s: float
) -> dict[str, Any]:
    decided: list[tuple[float, ThrottleDecided]] = []
    metrics: list[tuple[float, NodeMetrics]] = []
    out: dict[str, Any] = {}
    async with StokerClient(settings) as client:
        tail = client.reader.tail(
            settings.topics.throttle, (ThrottleDecided,), lambda d: decided.append((time.monotonic(), d))
        )
        await tail.start()
        figures = client.reader.tail(
            settings.topics.node_metric, (NodeMetrics,), lambda m: metrics.append((time.monotonic(), m)), traced=False
        )
        await figures.start()
        await deploy(client, settings, "victim", VICTIM)
        for _ in range(5):
            await client.invoke("victim", None)
        for shape in shapes:
            console.print(f"shape {shape}")
            out[shape] = await run_shape(client, settings, shape, decided, metrics, rate, phase_s, shape_s)
        out["victim_decisions"] = [d.model_dump(mode="json") for _, d in decided if d.function == "victim"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="noisy shapes to run, in order")
    parser.add_argument("--rate", type=float, default=10.0, help="victim invocations per second")
    parser.add_argument("--phase-s", type=float, default=10.0, help="baseline phase before each shape, seconds")
    parser.add_argument("--shape-s", type=float, default=20.0, help="how long each shape runs")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    if bad := [s for s in shapes if s not in SHAPES]:
        parser.error(f"unknown shapes {bad}: expected some of {', '.join(SHAPES)}")
    load_before = os.getloadavg()
    console.print("starting a platform: one runtime node, one isolation node")
    env = {"STOKER_THROTTLE_COOLDOWN_S": "600", "STOKER_THROTTLE_HOST_PRESSURE": "on"}
    with own_platform(env, "--nodes", "1") as (penv, _http):
        outcome = asyncio.run(run(settings_of(penv), shapes, args.rate, args.phase_s, args.shape_s))
    report = {
        "scenario": "throttle",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_facts(KAFKA_VERSION) | {"loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "inputs": vars(args) | {"out": str(args.out)},
        **outcome,
    }
    table = Table(
        "shape",
        "shows after s",
        "clamp (intervals)",
        "isolation (intervals)",
        "victim p99 before ms",
        "during ms",
        "after isolation ms",
        "after / before",
        title="Each noisy shape next to a well-behaved function (targets: <= 2, <= 5, <= 1.5x)",
    )
    for shape in shapes:
        o = outcome[shape]
        before, during, after = (o["victim_ms"][k].get("p99") for k in ("before", "during", "after"))
        table.add_row(
            shape,
            str(o["shows_after_s"]),
            str(o["intervals_to_clamp"]),
            str(o["intervals_to_isolation"]),
            str(before),
            str(during),
            str(after),
            f"{after / before:.2f}" if before and after else "-",
        )
    console.print(table)
    console.print(
        f"load average before {load_before[0]:.2f}, after {report['machine']['loadavg_after'][0]:.2f}; "
        f"decisions about the victim: {len(outcome['victim_decisions'])}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"throttle-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    console.print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
