"""The spine benchmark: warm and first-invocation latency over Kafka, next to a bare Kafka round trip.

    python -m loadtest.spine [--warm 1000] [--cold 20] [--bare 1000]

Uses a running platform (``stoker up --detach``) at ``$STOKER_BOOTSTRAP``, or starts one itself
(and stops it after). Every figure goes through the platform's own client code.
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
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from events import FunctionSpec, TopicSpec
from loadtest.stats import machine_facts, summary
from services.cli.broker import KAFKA_VERSION, platform_broker_is_reachable
from services.common.admin import ensure_topics
from services.common.client import StokerClient, package_code
from services.common.kafkasec import client_options as kafka_client_options
from services.common.runner import ready_file
from services.common.settings import CommonSettings

console = Console()
NOOP = "def main(event):\n    return None\n"


async def bare_round_trip(settings: CommonSettings, n: int) -> list[float]:
    """Produce -> consume on the same broker, with the platform's producer settings (1 hop)."""
    topic = f"{settings.topic_prefix}bench.bare"
    await ensure_topics(settings.bootstrap, [TopicSpec(topic, retention_ms=3_600_000)])
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap, **kafka_client_options(), acks="all", enable_idempotence=True, linger_ms=0
    )
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap, **kafka_client_options(), enable_auto_commit=False, fetch_max_wait_ms=100
    )
    await producer.start()
    await consumer.start()
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    await consumer.seek_to_end(tp)
    await consumer.position(tp)
    samples = []
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("bare Kafka round trip", total=n)
            for i in range(n + 20):
                started = time.perf_counter()
                await producer.send_and_wait(topic, b"%d" % i)
                await consumer.getone()
                if i >= 20:  # the first ones warm connections up
                    samples.append((time.perf_counter() - started) * 1000)
                    progress.advance(task)
    finally:
        await consumer.stop()
        await producer.stop()
    return samples


async def deploy_noop(client: StokerClient, settings: CommonSettings, name: str, marker: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "handler.py").write_text(NOOP + f"# {marker}\n")
        source = package_code(settings, Path(tmp))
    await client.put_function(FunctionSpec(name=name, entrypoint="handler:main", source=source))


async def warm(settings: CommonSettings, n: int) -> tuple[list[float], dict[str, list[float]], dict[str, int]]:
    """Sequential invocations of a no-op function over Kafka (client publish -> client sees result)."""
    samples: list[float] = []
    parts: dict[str, list[float]] = {"queue": [], "exec": [], "total": []}
    kinds: dict[str, int] = {}
    async with StokerClient(settings) as client:
        await deploy_noop(client, settings, "bench-noop", "warm")
        for _ in range(5):
            await client.invoke("bench-noop", None, timeout_s=30)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("warm invocations", total=n)
            for _ in range(n):
                started = time.perf_counter()
                result = await client.invoke("bench-noop", None, timeout_s=30)
                samples.append((time.perf_counter() - started) * 1000)
                if result.status != "ok":
                    raise RuntimeError(f"bench invocation failed: {result}")
                kinds[result.start or "?"] = kinds.get(result.start or "?", 0) + 1
                for key in parts:
                    parts[key].append(getattr(result.timings_ms, key))
                progress.advance(task)
    return samples, parts, kinds


async def first_invocations(settings: CommonSettings, n: int) -> tuple[list[float], dict[str, int], list[float]]:
    """The first invocation of a just-created function: a generic pool instance is specialized."""
    samples: list[float] = []
    start_ms: list[float] = []
    kinds: dict[str, int] = {}
    async with StokerClient(settings) as client:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("first invocations", total=n)
            for i in range(n):
                await wait_for_generic(client)
                name = f"bench-cold-{uuid.uuid4().hex[:8]}"
                await deploy_noop(client, settings, name, f"cold {i}")
                started = time.perf_counter()
                result = await client.invoke(name, None, timeout_s=30)
                samples.append((time.perf_counter() - started) * 1000)
                start_ms.append(result.timings_ms.start)
                kinds[result.start or "?"] = kinds.get(result.start or "?", 0) + 1
                await client.delete_function(name)  # its instance is recycled by keep-alive policy
                progress.advance(task)
    return samples, kinds, start_ms


async def wait_for_generic(client: StokerClient, timeout_s: float = 10.0) -> None:
    """Wait until every node reports a generic instance (the pool refilled after the last run)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        nodes = await client.nodes()
        beats = [n for n in nodes.values() if n.type == "node.heartbeat"]
        if beats and all(any(i.state == "generic" for i in n.instances) for n in beats):  # type: ignore[union-attr]
            return
        await asyncio.sleep(0.1)


def ensure_platform(settings: CommonSettings) -> bool:
    """Start a platform unless one answers; True if this program started it."""
    if platform_broker_is_reachable(settings.bootstrap) and ready_file(settings, "dispatcher").exists():
        return False
    console.print("no platform running: starting one with `stoker up --detach --no-example`")
    subprocess.run([str(Path(sys.executable).parent / "stoker"), "up", "--detach", "--no-example"], check=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm", type=int, default=1000, help="sequential warm invocations")
    parser.add_argument("--cold", type=int, default=20, help="first invocations of new functions")
    parser.add_argument("--bare", type=int, default=1000, help="bare Kafka round trips")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    args = parser.parse_args(argv)
    settings = CommonSettings.from_env()
    started_here = ensure_platform(settings)
    try:
        bare = asyncio.run(bare_round_trip(settings, args.bare))
        warm_ms, warm_parts, warm_kinds = asyncio.run(warm(settings, args.warm))
        cold_ms, cold_kinds, cold_start = asyncio.run(first_invocations(settings, args.cold))
    finally:
        if started_here:
            subprocess.run([str(Path(sys.executable).parent / "stoker"), "down"], check=False)
    report: dict[str, Any] = {
        "scenario": "spine",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_facts(KAFKA_VERSION),
        "inputs": {"warm": args.warm, "cold": args.cold, "bare": args.bare},
        "bare_kafka_round_trip_ms": summary(bare),
        "warm_invocation_ms": summary(warm_ms),
        "warm_parts_ms": {k: summary(v) for k, v in warm_parts.items()},
        "warm_start_kinds": warm_kinds,
        "first_invocation_ms": summary(cold_ms),
        "first_invocation_start_phase_ms": summary(cold_start),
        "first_invocation_start_kinds": cold_kinds,
    }
    table = Table("measure", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", title="Stoker spine benchmark")
    for label, key in (
        ("bare Kafka produce->consume (1 hop)", "bare_kafka_round_trip_ms"),
        ("warm invocation over Kafka (client->result)", "warm_invocation_ms"),
        ("first invocation (pool specialization)", "first_invocation_ms"),
        ("  of which: specializing the instance", "first_invocation_start_phase_ms"),
    ):
        s = report[key]
        table.add_row(
            label, str(s.get("n")), str(s.get("p50")), str(s.get("p90")), str(s.get("p99")), str(s.get("max"))
        )
    console.print(table)
    console.print(f"start kinds: warm run {warm_kinds}, first invocations {cold_kinds}")
    ratio = report["warm_invocation_ms"]["p50"] / max(report["bare_kafka_round_trip_ms"]["p50"], 1e-9)
    console.print(f"warm p50 = {ratio:.1f} x the bare 1-hop round trip (the path has 3 Kafka hops)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"spine-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    console.print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
