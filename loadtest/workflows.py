"""Workflow overhead and prewarm benchmark.

    python -m loadtest.workflows [--runs 20]

On a platform of its own: a 5-step sequence and a 10-way fan-out of no-op functions, run as
workflows, next to the same functions invoked back to back (and 10 at once) from a client; and the
cold starts of a 5-step sequence of never-used functions with and without prewarming the steps.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from events import FunctionSpec, RunStarted, StepFinished
from loadtest.platform import own_platform, settings_of
from loadtest.stats import machine_facts, summary
from services.cli.broker import KAFKA_VERSION
from services.common.client import StokerClient, package_code
from services.common.settings import CommonSettings
from services.workflow.dsl import load

console = Console()
NOOP = "def main(event):\n    return event\n"
STEP = "import time\n\ndef main(event):\n    time.sleep(0.3)  # time to prewarm the next step\n    return 1\n"
WARM_KINDS = ("warm", "prewarmed")


def sequence_yaml(functions: list[str], prewarm: bool = True) -> str:
    lines = [f"prewarm: {'true' if prewarm else 'false'}", "steps:"]
    for i, fn in enumerate(functions):
        lines += [f"  - id: s{i}", f"    function: {fn}"]
        if i:
            lines.append(f"    after: [s{i - 1}]")
    return "\n".join(lines) + "\n"


FANOUT = """
steps:
  - id: fan
    function: noop
    map: $.input.items
    max_parallel: 10
    input: $.item
"""


async def deploy(client: StokerClient, settings: CommonSettings, name: str, code: str = NOOP) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "handler.py").write_text(code + f"# {name}\n")
        source = package_code(settings, Path(tmp))
    await client.put_function(FunctionSpec(name=name, entrypoint="handler:main", source=source))


async def create_workflow(client: StokerClient, settings: CommonSettings, name: str, text: str) -> None:
    functions = await client.functions()
    await client.send(load(name, text, lambda f: f in functions), settings.topics.workflow, name)


async def step_kinds(client: StokerClient, settings: CommonSettings, run: str) -> list[str]:
    events = [e for e in await client.history(settings.topics.workflow_run, key=run)]
    assert events and isinstance(events[0], RunStarted)
    return [e.start or "?" for e in events if isinstance(e, StepFinished) and e.status == "ok"]


async def measure(settings: CommonSettings, runs: int) -> dict[str, Any]:
    out: dict[str, list[float]] = {
        "sequence_workflow": [],
        "sequence_client": [],
        "fanout_workflow": [],
        "fanout_client": [],
    }
    async with StokerClient(settings) as client:
        await deploy(client, settings, "noop")
        await create_workflow(client, settings, "seq5", sequence_yaml(["noop"] * 5))
        await create_workflow(client, settings, "fan10", FANOUT)
        for _ in range(3):  # warm everything up
            await client.invoke("seq5", None)
            await client.invoke("fan10", {"items": list(range(10))})
        for _ in range(runs):
            started = time.perf_counter()
            result = await client.invoke("seq5", 1, timeout_s=60)
            assert result.status == "ok", result
            out["sequence_workflow"].append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            for _ in range(5):
                await client.invoke("noop", 1)
            out["sequence_client"].append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            result = await client.invoke("fan10", {"items": list(range(10))}, timeout_s=60)
            assert result.status == "ok", result
            out["fanout_workflow"].append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            await asyncio.gather(*(client.invoke("noop", i) for i in range(10)))
            out["fanout_client"].append((time.perf_counter() - started) * 1000)
        cold: dict[str, dict[str, int]] = {}
        for prewarm in (False, True):
            kinds: dict[str, int] = {}
            for _ in range(max(2, runs // 5)):
                functions = [f"c{uuid.uuid4().hex[:8]}" for _ in range(5)]
                for fn in functions:
                    await deploy(client, settings, fn, STEP)
                name = f"cold-{uuid.uuid4().hex[:6]}"
                await create_workflow(client, settings, name, sequence_yaml(functions, prewarm))
                result = await client.invoke(name, None, timeout_s=60)
                assert result.status == "ok", result
                for kind in (await step_kinds(client, settings, result.id))[1:]:  # steps after the first
                    kinds[kind] = kinds.get(kind, 0) + 1
            cold["with prewarm" if prewarm else "without prewarm"] = kinds
    return {"latency_ms": {k: summary(v) for k, v in out.items()}, "later_step_start_kinds": cold}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    args = parser.parse_args(argv)
    with own_platform() as (env, _http):
        outcome = asyncio.run(measure(settings_of(env), args.runs))
    report = {
        "scenario": "workflows",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_facts(KAFKA_VERSION),
        "inputs": {"runs": args.runs},
        **outcome,
    }
    table = Table("measure", "n", "p50 ms", "p99 ms", title="workflow overhead")
    for key, s in outcome["latency_ms"].items():
        table.add_row(key, str(s["n"]), str(s["p50"]), str(s["p99"]))
    console.print(table)
    lat = outcome["latency_ms"]
    console.print(
        f"5-step sequence: workflow p50 {lat['sequence_workflow']['p50']} ms vs client back to back "
        f"{lat['sequence_client']['p50']} ms; 10-way fan-out: {lat['fanout_workflow']['p50']} ms vs "
        f"{lat['fanout_client']['p50']} ms"
    )
    for label, kinds in outcome["later_step_start_kinds"].items():
        cold = sum(v for k, v in kinds.items() if k not in WARM_KINDS)
        console.print(f"steps 2-5 of new functions, {label}: {kinds} -> {cold} cold starts")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"workflows-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    console.print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
