"""Noisy-neighbour benchmark: a CPU hog next to a well-behaved function on one runtime node.

    python -m loadtest.throttle [--rate 10] [--phase-s 15] [--hog-s 20]

Starts a platform with one runtime node and one isolation node. A well-behaved function (a few ms of
work) is invoked at a steady rate throughout; after a baseline phase a hog spinning the CPU starts
on the same node. Reports the seconds from the hog's start to its clamp and to its isolation (from
the throttler's decisions), and the victim's latency percentiles before, during and after.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from events import FunctionSpec, ThrottleDecided
from loadtest.platform import own_platform, settings_of
from loadtest.stats import machine_facts, summary
from services.cli.broker import KAFKA_VERSION
from services.common.client import StokerClient, package_code
from services.common.settings import CommonSettings

console = Console()
VICTIM = """import time

def main(event):
    end = time.perf_counter() + 0.003  # a few milliseconds of honest work
    while time.perf_counter() < end:
        pass
    return 1
"""
HOG = """import time

def main(event):
    end = time.time() + event['seconds']
    while time.time() < end:
        pass
    return 0
"""


async def deploy(client: StokerClient, settings: CommonSettings, name: str, code: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "handler.py").write_text(code)
        source = package_code(settings, Path(tmp))
    await client.put_function(
        FunctionSpec(name=name, entrypoint="handler:main", source=source, timeout_s=120, concurrency=1000)
    )


async def run(settings: CommonSettings, rate: float, phase_s: float, hog_s: float) -> dict[str, Any]:
    decided: list[tuple[float, ThrottleDecided]] = []
    latencies: list[tuple[float, float, str]] = []  # (sent at, ms, status)
    async with StokerClient(settings) as client:
        tail = client.reader.tail(
            settings.topics.throttle, (ThrottleDecided,), lambda d: decided.append((time.monotonic(), d))
        )
        await tail.start()
        await deploy(client, settings, "victim", VICTIM)
        await deploy(client, settings, "hog", HOG)
        for _ in range(5):
            await client.invoke("victim", None)

        async def one() -> None:
            sent = time.monotonic()
            result = await client.invoke("victim", None, timeout_s=60)
            latencies.append((sent, (time.monotonic() - sent) * 1000, result.status))

        started = time.monotonic()
        hog_task: asyncio.Task[Any] | None = None
        hog_started = started + phase_s
        tasks = []
        total_s = 2 * phase_s + hog_s
        n = 0
        while time.monotonic() - started < total_s:
            if hog_task is None and time.monotonic() >= hog_started:
                hog_started = time.monotonic()
                hog_task = asyncio.create_task(client.invoke("hog", {"seconds": hog_s}, timeout_s=hog_s + 60))
            tasks.append(asyncio.create_task(one()))
            n += 1
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))  # open loop
        await asyncio.gather(*tasks)
        if hog_task is not None:
            await hog_task
    hog = [(t, d) for t, d in decided if d.function == "hog"]
    clamp = next((t for t, d in hog if d.action == "clamp"), None)
    isolate = next((t for t, d in hog if d.action == "isolate"), None)
    isolated_at = isolate or (hog_started + hog_s)
    phases = {
        "before": [ms for t, ms, _ in latencies if t < hog_started],
        "during": [ms for t, ms, _ in latencies if hog_started <= t < isolated_at],
        "after": [ms for t, ms, _ in latencies if t >= isolated_at + 2.0],
    }
    return {
        "seconds_to_clamp": None if clamp is None else round(clamp - hog_started, 2),
        "seconds_to_isolation": None if isolate is None else round(isolate - hog_started, 2),
        "decisions": [d.model_dump(mode="json") for _, d in hog],
        "victim_ms": {k: summary(v) for k, v in phases.items()},
        "victim_errors": sum(1 for _, _, s in latencies if s != "ok"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=10.0, help="victim invocations per second")
    parser.add_argument("--phase-s", type=float, default=15.0, help="baseline and after phases, seconds")
    parser.add_argument("--hog-s", type=float, default=20.0, help="how long the hog spins")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    args = parser.parse_args(argv)
    console.print("starting a platform: one runtime node, one isolation node")
    with own_platform({"STOKER_THROTTLE_COOLDOWN_S": "600"}, "--nodes", "1") as (env, _http):
        outcome = asyncio.run(run(settings_of(env), args.rate, args.phase_s, args.hog_s))
    report = {
        "scenario": "throttle",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_facts(KAFKA_VERSION),
        "inputs": vars(args) | {"out": str(args.out)},
        **outcome,
    }
    console.print(
        f"hog clamped after {outcome['seconds_to_clamp']} s, isolated after "
        f"{outcome['seconds_to_isolation']} s (metric interval 1 s)"
    )
    table = Table("victim phase", "n", "p50 ms", "p99 ms", "max ms", title="well-behaved function next to the hog")
    for phase, s in outcome["victim_ms"].items():
        table.add_row(phase, str(s.get("n")), str(s.get("p50")), str(s.get("p99")), str(s.get("max")))
    console.print(table)
    before, after = outcome["victim_ms"]["before"].get("p99"), outcome["victim_ms"]["after"].get("p99")
    if before and after:
        console.print(f"p99 after isolation is {after / before:.2f} x the baseline (target <= 1.2)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"throttle-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    console.print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
