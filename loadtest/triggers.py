"""Topic-trigger throughput next to a direct consumer of the same topic, same run, same broker.

    python -m loadtest triggers [--records 2000] [--concurrency 32] [--partitions 3]

A source topic is filled with ``--records`` small JSON records first. Then, one after the other:

- **direct**: one aiokafka consumer-group member reads the topic from the beginning, calls the
  no-op function in-process, writes each output to a response topic and commits a batch's
  offsets once its writes are confirmed (at-least-once, like the trigger): the floor.
- **invoke**: the same number of invocations of the same function through ``StokerClient``, as
  many at once as the trigger's concurrency: the invocation path on its own, without a trigger.
- **trigger**: ``stoker trigger create --from earliest --response-topic …``: every record becomes
  a Stoker invocation (dispatcher, node agent, an instance process, result) and its output is
  written to the response topic before its offset is committed.

Each figure is records per second over the response topic's timestamps (first to last response),
and end to end (from the start of consuming to the last response, which includes joining the
group and, for the trigger, the instances' start).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from rich.table import Table

from events.topics import TopicSpec
from loadtest.harness import add_common_args, console, fmt, new_report, save, target
from services.common.admin import ensure_topics
from services.common.client import StokerClient
from services.common.kafkasec import client_options as kafka_client_options
from services.common.settings import CommonSettings
from services.common.views import partitions_of

HANDLER = "def main(event, context=None):\n    return {'ok': True, 'offset': event.get('offset')}\n"


def noop(event: dict[str, Any]) -> dict[str, Any]:
    """The same function the trigger runs, called in-process by the direct consumer."""
    return {"ok": True, "offset": event.get("offset")}


async def fill(bootstrap: str, topic: str, n: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **kafka_client_options(), acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, orjson.dumps({"n": i, "pad": "x" * 64}), key=f"k{i % 97}".encode())
            for i in range(n)
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def response_span(bootstrap: str, topic: str, n: int, timeout_s: float) -> tuple[int, int, int]:
    """Wait until ``topic`` holds ``n`` records; (count, first timestamp ms, last timestamp ms)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, **kafka_client_options(), enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        tps = await partitions_of(consumer, topic)
        consumer.assign(tps)
        count, first, last = 0, None, None
        deadline = time.monotonic() + timeout_s
        while count < n and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for recs in batches.values():
                for rec in recs:
                    count += 1
                    first = rec.timestamp if first is None else min(first, rec.timestamp)
                    last = rec.timestamp if last is None else max(last, rec.timestamp)
        if count < n:
            raise RuntimeError(f"only {count} of {n} responses on {topic} within {timeout_s:.0f} s")
        assert first is not None and last is not None
        return count, first, last
    finally:
        await consumer.stop()


async def direct(bootstrap: str, source: str, out: str, n: int) -> None:
    """The direct consumer: read, call, write, commit after confirmation; until ``n`` are written."""
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=bootstrap,
        **kafka_client_options(),
        group_id=f"bench-direct-{time.time_ns()}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=500,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, **kafka_client_options(), acks="all", enable_idempotence=True, linger_ms=2
    )
    await consumer.start()
    await producer.start()
    written = 0
    try:
        while written < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=500)
            futures = []
            positions: dict[TopicPartition, OffsetAndMetadata] = {}
            for tp, recs in batches.items():
                for rec in recs:
                    event = {"value": orjson.loads(rec.value), "offset": rec.offset, "partition": rec.partition}
                    futures.append(await producer.send(out, orjson.dumps(noop(event)), key=rec.key))
                    positions[tp] = OffsetAndMetadata(rec.offset + 1, "")
            if futures:
                await asyncio.gather(*futures)
                await consumer.commit(positions)
                written += len(futures)
    finally:
        await consumer.stop()
        await producer.stop()


async def invoke_all(common: CommonSettings, function: str, n: int, concurrency: int) -> tuple[int, float, float]:
    """``n`` invocations, ``concurrency`` at a time; (ok count, start s, end s)."""
    gate = asyncio.Semaphore(concurrency)
    ok = 0
    async with StokerClient(common) as client:
        await client.invoke(function, {"offset": -1})  # the results listener is in place before timing

        async def one(i: int) -> None:
            nonlocal ok
            async with gate:
                result = await client.invoke(function, {"offset": i}, timeout_s=120)
                ok += result.status == "ok"

        started = time.time()
        await asyncio.gather(*(one(i) for i in range(n)))
        return ok, started, time.time()


def rates(n: int, first_ms: int, last_ms: int, started_s: float, ended_s: float) -> dict[str, Any]:
    steady = n / max(0.001, (last_ms - first_ms) / 1000)
    return {
        "records": n,
        "per_s_steady": round(steady, 1),
        "per_s_end_to_end": round(n / max(0.001, ended_s - started_s), 1),
        "span_s": round((last_ms - first_ms) / 1000, 2),
        "end_to_end_s": round(ended_s - started_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest triggers", description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--records", type=int, default=2000, help="records on the source topic")
    parser.add_argument("--concurrency", type=int, default=32, help="the trigger's concurrency")
    parser.add_argument("--partitions", type=int, default=3, help="partitions of the source topic")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="longest wait for either side")
    args = parser.parse_args(argv)
    report = new_report(
        "triggers", args, {"records": args.records, "concurrency": args.concurrency, "partitions": args.partitions}
    )
    stamp = time.strftime("%H%M%S")
    source, direct_out, trigger_out = f"bench.src-{stamp}", f"bench.direct-{stamp}", f"bench.trigger-{stamp}"
    with target(args, {}, "--nodes", "1", "--isolated", "0") as tgt, tempfile.TemporaryDirectory() as tmp:
        common: CommonSettings = tgt.settings
        code = Path(tmp) / "noop"
        code.mkdir()
        (code / "handler.py").write_text(HANDLER)
        tgt.stoker(
            "fn",
            "create",
            f"bench-noop-{stamp}",
            "--code",
            str(code),
            "--entrypoint",
            "handler:main",
            "--concurrency",
            str(args.concurrency),
            "--timeout",
            "10",
        )
        tgt.stoker("fn", "invoke", f"bench-noop-{stamp}", "--data", "{}")  # its first instance is ready
        specs = [TopicSpec(t, partitions=args.partitions) for t in (source, direct_out, trigger_out)]
        asyncio.run(ensure_topics(common.bootstrap, specs))
        console.print(f"filling {source} with {args.records} records")
        asyncio.run(fill(common.bootstrap, source, args.records))

        console.print("direct consumer ...")
        started = time.time()
        asyncio.run(direct(common.bootstrap, source, direct_out, args.records))
        n, first, last = asyncio.run(response_span(common.bootstrap, direct_out, args.records, args.timeout_s))
        report["direct"] = rates(n, first, last, started, last / 1000)

        console.print("invocations through StokerClient ...")
        ok, started, ended = asyncio.run(invoke_all(common, f"bench-noop-{stamp}", args.records, args.concurrency))
        report["invoke"] = {
            "records": ok,
            "per_s_steady": round(ok / max(0.001, ended - started), 1),
            "per_s_end_to_end": round(ok / max(0.001, ended - started), 1),
        }

        console.print("trigger ...")
        started = time.time()
        tgt.stoker(
            "trigger",
            "create",
            f"bench-{stamp}",
            "--topic",
            source,
            "--function",
            f"bench-noop-{stamp}",
            "--response-topic",
            trigger_out,
            "--concurrency",
            str(args.concurrency),
            "--from",
            "earliest",
        )
        n, first, last = asyncio.run(response_span(common.bootstrap, trigger_out, args.records, args.timeout_s))
        report["trigger"] = rates(n, first, last, started, last / 1000)
        report["trigger_status"] = orjson.loads(tgt.stoker("trigger", "get", f"bench-{stamp}"))["status"]
        tgt.stoker("trigger", "delete", f"bench-{stamp}")
        report["platform"] = tgt.describe()

    table = Table("path", "records", "records/s (first→last response)", "records/s end to end", title="triggers")
    for side in ("direct", "invoke", "trigger"):
        r = report[side]
        table.add_row(side, str(r["records"]), fmt(r["per_s_steady"], 1), fmt(r["per_s_end_to_end"], 1))
    console.print(table)
    ratio = report["trigger"]["per_s_steady"] / max(0.001, report["direct"]["per_s_steady"])
    report["trigger_over_direct"] = round(ratio, 4)
    console.print(f"trigger / direct (steady): {ratio:.3f}")
    save(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
