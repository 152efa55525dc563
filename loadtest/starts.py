"""Instance start benchmark: Execute received -> function running, per start kind, next to `python -c`.

    python -m loadtest.starts [--reps 20]

For a light function and one that imports a heavy set of modules (json, email, decimal, asyncio),
measures the agent's ``start`` phase (from taking the Execute command to the instance holding the
function's code, ready to run it) for each start kind, on three platforms started for the purpose:
pool size 2 with the zygote (warm, prewarmed, pool), pool size 0 with the zygote (zygote), and pool
size 0 without it (spawn). Next to them: the wall time of a plain `python -c` running the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from events import FunctionSpec, PrewarmCompleted, PrewarmRequested
from loadtest.platform import own_platform, settings_of
from loadtest.stats import machine_facts, summary
from services.cli.broker import KAFKA_VERSION
from services.common.client import StokerClient, package_code
from services.common.settings import CommonSettings

console = Console()
CODE = {
    "light": "def main(event):\n    return None\n",
    "heavy": "import json, email, email.mime.text, decimal, asyncio\n\ndef main(event):\n    return None\n",
}


def python_c(code: str, reps: int) -> list[float]:
    """Wall time of a new interpreter that imports and runs the function."""
    samples = []
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "handler.py").write_text(code)
        for _ in range(reps):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import handler; handler.main(None)"], cwd=tmp, check=True)
            samples.append((time.perf_counter() - started) * 1000)
    return samples


async def new_function(client: StokerClient, settings: CommonSettings, variant: str) -> str:
    name = f"b-{variant}-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "handler.py").write_text(CODE[variant] + f"# {name}\n")
        source = package_code(settings, Path(tmp))
    await client.put_function(FunctionSpec(name=name, entrypoint="handler:main", source=source))
    return name


async def wait_generic(client: StokerClient, want: int) -> None:
    for _ in range(100):
        nodes = await client.nodes()
        beats = [
            n for n in nodes.values() if n.type == "node.heartbeat" and n.labels.get("stoker.io/role") == "runtime"
        ]  # type: ignore[union-attr]
        if beats and all(sum(i.state == "generic" for i in n.instances) >= want for n in beats):  # type: ignore[union-attr]
            return
        await asyncio.sleep(0.05)


async def measure(settings: CommonSettings, kinds: list[str], reps: int) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    done: dict[str, PrewarmCompleted] = {}
    async with StokerClient(settings) as client:
        tail = client.reader.tail(
            settings.topics.prewarm, (PrewarmCompleted,), lambda e: done.__setitem__(e.function, e)
        )
        await tail.start()
        for variant in CODE:
            samples: dict[str, list[float]] = {k: [] for k in kinds}
            if "warm" in kinds:
                name = await new_function(client, settings, variant)
                await client.invoke(name, None)
                for _ in range(reps):
                    result = await client.invoke(name, None)
                    assert result.start == "warm", result
                    samples["warm"].append(result.timings_ms.start)
            for kind in [k for k in kinds if k != "warm"]:
                for _ in range(reps):
                    if kind == "pool":
                        await wait_generic(client, 1)
                    name = await new_function(client, settings, variant)
                    if kind == "prewarmed":
                        await client.send(PrewarmRequested(function=name, count=1), settings.topics.prewarm, name)
                        while name not in done:
                            await asyncio.sleep(0.005)
                    result = await client.invoke(name, None)
                    if result.start != kind:
                        console.print(f"[yellow]wanted {kind}, got {result.start}[/yellow]")
                        continue
                    samples[kind].append(result.timings_ms.start)
                    await client.delete_function(name)
            out[variant] = samples
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    args = parser.parse_args(argv)
    phases = [
        ({"STOKER_POOL_SIZE": "2"}, ["warm", "prewarmed", "pool"], ("--pool-size", "2")),
        ({"STOKER_POOL_SIZE": "0"}, ["zygote"], ("--pool-size", "0")),
        ({"STOKER_POOL_SIZE": "0", "STOKER_ZYGOTE": "off"}, ["spawn"], ("--pool-size", "0")),
    ]
    figures: dict[str, dict[str, list[float]]] = {v: {} for v in CODE}
    for env, kinds, up_args in phases:
        console.print(f"platform for {', '.join(kinds)}")
        with own_platform(env, *up_args) as (penv, _http):
            for variant, samples in asyncio.run(measure(settings_of(penv), kinds, args.reps)).items():
                figures[variant].update(samples)
    for variant, code in CODE.items():
        figures[variant]["python -c"] = python_c(code, args.reps)
    report: dict[str, Any] = {
        "scenario": "starts",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_facts(KAFKA_VERSION),
        "inputs": {"reps": args.reps, "code": CODE},
        "start_ms": {v: {k: summary(s) for k, s in f.items()} for v, f in figures.items()},
    }
    table = Table(
        "function",
        "start kind",
        "n",
        "p50 ms",
        "p99 ms",
        "vs spawn p50",
        title="Execute received -> function ready to run",
    )
    for variant, kinds in report["start_ms"].items():
        spawn = kinds.get("spawn", {}).get("p50") or float("nan")
        for kind, s in kinds.items():
            ratio = s.get("p50", float("nan")) / spawn if spawn == spawn and s.get("n") else float("nan")
            table.add_row(variant, kind, str(s.get("n")), str(s.get("p50")), str(s.get("p99")), f"{ratio:.3f}")
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"starts-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    console.print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
