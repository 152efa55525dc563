"""Where a warm invocation's time goes, hop by hop, from the Kafka records themselves.

    python -m loadtest hops [--n 300] [--concurrent 600] [--concurrency 8]

Invokes a no-op function through ``StokerClient`` and reads back, with their Kafka timestamps
(``CreateTime``, set by each producer when it sends), the invocation record the client wrote, the
``work.execute`` command the dispatcher wrote to the node's work topic, and the result the agent
wrote; the client notes when it sent and when the result reached it. Per invocation:

- **client -> dispatcher -> Execute written**: the invocation's hop to the dispatcher, its routing,
  and its write of the command (the dispatcher commits its offset after the write is confirmed);
- **Execute -> result written**: the command's hop to the agent, the instance's run, the result's write;
- **result -> client**: the result's hop back to the client.

The same split for the direct consumer (invocation -> result written -> client) runs alongside.
Nothing is instrumented: every figure comes from records any Kafka client can read.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from rich.table import Table

from events import InvocationCompleted, InvocationRequested, NodeHeartbeat
from events.codec import DecodeError, decode
from events.work import Execute
from loadtest import harness
from loadtest.direct import direct_consumer
from loadtest.floor import noop_code
from loadtest.harness import console, fmt
from loadtest.stats import latency_summary
from loadtest.warm import create_noop, delete
from services.common.client import StokerClient
from services.common.kafkasec import client_options as kafka_client_options
from services.common.settings import CommonSettings
from services.common.views import partitions_of


class Recorder:
    """Reads topics from their current end, keeping each record's timestamp by invocation id."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.seen: dict[str, dict[str, int]] = {}
        """invocation id -> {"invocation" | "execute" | "result": CreateTime ms}"""
        self._consumer: AIOKafkaConsumer | None = None
        self._ends: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, **kafka_client_options(), enable_auto_commit=False
        )
        await self._consumer.start()
        tps = [tp for topic in self.topics for tp in await partitions_of(self._consumer, topic)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:
            await self._consumer.position(tp)

    async def drain(self) -> None:
        """Read everything written until now, then stop."""
        assert self._consumer is not None
        tps = list(self._consumer.assignment())
        ends = await self._consumer.end_offsets(tps)
        while any([await self._consumer.position(tp) < end for tp, end in ends.items()]):
            for records in (await self._consumer.getmany(timeout_ms=200)).values():
                for rec in records:
                    self._note(rec.value, rec.timestamp)
        await self._consumer.stop()

    def _note(self, value: bytes | None, ts: int) -> None:
        try:
            record = decode(value)
        except DecodeError:
            return
        if isinstance(record, InvocationRequested):
            self.seen.setdefault(record.id, {})["invocation"] = ts
        elif isinstance(record, Execute):
            self.seen.setdefault(record.invocation.id, {})["execute"] = ts
        elif isinstance(record, InvocationCompleted):
            self.seen.setdefault(record.id, {})["result"] = ts


async def measure(
    settings: CommonSettings, function: str, work_topics: list[str], n: int, concurrency: int
) -> dict[str, Any]:
    """``n`` invocations by ``concurrency`` callers; the split of each from the records' timestamps."""
    topics = settings.topics
    recorder = Recorder(settings.bootstrap, [topics.invocation, topics.result, *work_topics])
    sent: dict[str, tuple[float, float]] = {}
    async with StokerClient(settings) as client:
        for _ in range(20):
            await client.invoke(function, None, timeout_s=60)
        await recorder.start()
        remaining = n

        async def caller() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                began = time.time() * 1000
                result = await client.invoke(function, None, timeout_s=60)
                sent[result.id] = (began, time.time() * 1000)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    await recorder.drain()
    parts: dict[str, list[float]] = {}
    for ident, (began, received) in sent.items():
        ts = recorder.seen.get(ident, {})
        if "invocation" not in ts or "result" not in ts:
            continue
        stages = {"client send -> invocation record": ts["invocation"] - began}
        if "execute" in ts:
            stages["invocation -> Execute written (dispatcher)"] = ts["execute"] - ts["invocation"]
            stages["Execute -> result written (agent, instance)"] = ts["result"] - ts["execute"]
        else:
            stages["invocation -> result written"] = ts["result"] - ts["invocation"]
        stages["result -> client"] = received - ts["result"]
        stages["end to end"] = received - began
        for key, value in stages.items():
            parts.setdefault(key, []).append(value)
    return {
        "n": n,
        "concurrency": concurrency,
        "matched": len(parts.get("end to end", [])),
        "stages_ms": {k: latency_summary(v) for k, v in parts.items()},
    }


async def work_topics(settings: CommonSettings) -> list[str]:
    async with StokerClient(settings) as client:
        nodes = await client.nodes()
    return [settings.topics.work(b.node) for b in nodes.values() if isinstance(b, NodeHeartbeat)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="sequential invocations")
    parser.add_argument("--concurrent", type=int, default=600, help="concurrent invocations")
    parser.add_argument("--concurrency", type=int, default=8)
    harness.add_common_args(parser)
    args = parser.parse_args(argv)
    report = harness.new_report(
        "hops", args, {"n": args.n, "concurrent": args.concurrent, "concurrency": args.concurrency}
    )
    name = f"bench-hops-{uuid.uuid4().hex[:6]}"
    runs: dict[str, Any] = {}
    with harness.target(args) as where:
        report["platform"] = where.describe()
        asyncio.run(create_noop(where, name))
        try:
            works = asyncio.run(work_topics(where.settings))
            with noop_code() as code, direct_consumer(where.settings, code) as direct:
                for mode, n, c in (("sequential", args.n, 1), ("concurrent", args.concurrent, args.concurrency)):
                    with console.status(f"direct consumer, {mode}"):
                        runs[f"direct consumer, {mode} x{c}"] = asyncio.run(measure(direct, "noop", [], n, c))
                    with console.status(f"Stoker, {mode}"):
                        runs[f"Stoker, {mode} x{c}"] = asyncio.run(measure(where.settings, name, works, n, c))
        finally:
            asyncio.run(delete(where, name))
    report["runs"] = runs
    table = Table("run", "stage", "p50 ms", "p90 ms", "p99 ms", title="Where the time goes (Kafka record timestamps)")
    for label, run in runs.items():
        for stage, s in run["stages_ms"].items():
            table.add_row(label, stage, fmt(s.get("p50")), fmt(s.get("p90")), fmt(s.get("p99")))
            label = ""
    console.print(table)
    harness.save(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
