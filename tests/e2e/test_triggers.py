"""Triggers through `stoker` like a user: a function per record of a team's own topic, and per cron slot.

One platform (`stoker up`, one runtime node) for the module. The topic trigger's records are plain
JSON, raw bytes, a poison record, a record too large for a function and keyed records in order;
the kill test SIGKILLs the trigger service mid-batch; the cron test runs a second copy of the
service and SIGKILLs the one that fires.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from events.topics import TopicSpec
from services.common.admin import ensure_topics
from services.common.runner import ready_file
from services.common.views import partitions_of
from tests.e2e.conftest import Platform, processes_under, start_platform
from tests.helpers import ServiceProcess, assert_eventually

HANDLER = '''
import time


def main(event, context):
    value = event.get("value")
    if isinstance(value, dict) and value.get("poison"):
        raise ValueError("poison record: this one always fails")
    if isinstance(value, dict) and value.get("sleep"):
        time.sleep(value["sleep"])
    return {
        "value": value,
        "encoding": event.get("value_encoding"),
        "key": event.get("key"),
        "headers": event.get("headers"),
        "topic": event.get("topic"),
        "partition": event.get("partition"),
        "offset": event.get("offset"),
        "timestamp": event.get("timestamp"),
        "invocation": context.invocation_id,
        "payload": event.get("payload"),
        "scheduled_ms": event.get("scheduled_ms"),
    }
'''


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    home = tmp_path_factory.mktemp("stoker-triggers")
    code = tmp_path_factory.mktemp("trigger-fn")
    (code / "handler.py").write_text(HANDLER)
    running, _ = start_platform(home, "--nodes", "1", "--isolated", "0", "--no-example", "--pool-size", "2")
    try:
        running.stoker(
            "fn", "create", "tfn", "--code", str(code), "--entrypoint", "handler:main", "--timeout", "40",
            "--concurrency", "16",
        )
        yield running
    finally:
        running.stoker("down", check=False)
        deadline = time.monotonic() + 10
        while processes_under(home) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not processes_under(home), f"processes left after `stoker down`: {processes_under(home)}"


# ----- Kafka as any team's client would use it --------------------------------------------------------


def make_topic(platform: Platform, name: str, partitions: int = 2) -> None:
    asyncio.run(ensure_topics(platform.settings.bootstrap, [TopicSpec(name, partitions=partitions)]))


def produce(platform: Platform, topic: str, records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]) -> None:
    async def go() -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=platform.settings.bootstrap, acks="all", max_request_size=2 * 1024 * 1024
        )
        await producer.start()
        try:
            futures = [await producer.send(topic, value, key=key, headers=headers) for key, value, headers in records]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(go())


def read_all(platform: Platform, topic: str) -> list[Any]:
    """Every committed record of ``topic`` now, in partition and offset order."""

    async def go() -> list[Any]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=platform.settings.bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
        )
        await consumer.start()
        try:
            tps = await partitions_of(consumer, topic)
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            for tp, start in (await consumer.beginning_offsets(tps)).items():
                consumer.seek(tp, start)
            out: list[Any] = []
            async def behind() -> bool:
                return any([await consumer.position(tp) < ends[tp] for tp in tps])

            while await behind():
                batches = await consumer.getmany(timeout_ms=500)
                for _tp, recs in batches.items():
                    out.extend(r for r in recs if r.offset < ends[_tp])
            out.sort(key=lambda r: (r.partition, r.offset))
            return out
        finally:
            await consumer.stop()

    return asyncio.run(go())


def trigger_get(platform: Platform, name: str) -> dict[str, Any]:
    return orjson.loads(platform.stoker("trigger", "get", name).stdout)  # type: ignore[no-any-return]


def responses(platform: Platform, topic: str) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in read_all(platform, topic)]


# ----- a topic trigger ----------------------------------------------------------------------------------


def test_a_topic_trigger_runs_the_function_per_record_with_errors_order_and_lag(platform: Platform) -> None:
    make_topic(platform, "orders", partitions=2)
    refused = platform.stoker("trigger", "create", "lost", "--topic", "no-such-topic", "--function", "tfn", check=False)
    assert refused.returncode != 0 and "does not exist" in refused.stderr
    unknown = platform.stoker("trigger", "create", "u", "--topic", "orders", "--function", "nope", check=False)
    assert unknown.returncode != 0 and "no function" in unknown.stderr
    platform.stoker(
        "trigger", "create", "orders-in", "--topic", "orders", "--function", "tfn",
        "--response-topic", "orders.done", "--error-topic", "orders.failed",
        "--max-retries", "2", "--backoff-s", "0.2", "--concurrency", "8", "--ordered", "per-key", "--from", "earliest",
    )
    again = platform.stoker("trigger", "create", "orders-in", "--topic", "orders", "--function", "tfn", check=False)
    assert again.returncode != 0 and "exists" in again.stderr

    traceparent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = [
        (b"order-1", orjson.dumps({"total": 3}), [("traceparent", traceparent), ("team", b"shop")]),
        (b"raw", b"\x00\x01 not json \xff", []),
        (b"bad", orjson.dumps({"poison": True}), []),
        (b"big", b"x" * 800_000, []),  # base64 makes it larger than a function may get
    ]
    # Keyed records that must run one after another per key (the first of each key is the slowest).
    for i in range(12):
        records.append((f"k{i % 3}".encode(), orjson.dumps({"seq": i, "sleep": 0.3 if i < 3 else 0.0}), []))
    produce(platform, "orders", records)

    def all_recorded() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        done, failed = responses(platform, "orders.done"), responses(platform, "orders.failed")
        assert len(done) == 14 and len(failed) == 2, (len(done), len(failed))
        return done, failed

    done, failed = assert_eventually(all_recorded, timeout_s=90, interval_s=0.5, message="every record recorded")
    by_key = {d["key"]: d for d in done}
    first = by_key["order-1"]
    assert first["value"] == {"total": 3} and first["encoding"] == "json" and first["topic"] == "orders"
    assert first["headers"]["team"] == "shop" and isinstance(first["timestamp"], int)
    assert first["invocation"] == f"trg.orders-in.orders-{first['partition']}-{first['offset']}"
    raw = by_key["raw"]
    assert raw["encoding"] == "base64" and base64.b64decode(raw["value"]) == b"\x00\x01 not json \xff"

    reasons = {f["key"]: f for f in failed}
    poison = reasons["bad"]
    assert poison["reason"] == "function_failed" and poison["error"]["kind"] == "ValueError"
    assert poison["attempts"] == 3 and len(poison["invocations"]) == 3  # the first try and two retries, then on
    assert poison["source_topic"] == "orders" and isinstance(poison["offset"], int)
    assert poison["value"] == {"poison": True}
    big = reasons["big"]
    assert big["reason"] == "record_too_large" and big["attempts"] == 0 and "bytes" in big["error"]["message"]

    # Per key, responses were written in the order of the source records.
    for key in ("k0", "k1", "k2"):
        seqs = [d["value"]["seq"] for d in done if d["key"] == key]
        assert seqs == sorted(seqs) and len(seqs) == 4, (key, seqs)

    def caught_up() -> dict[str, Any]:
        status = trigger_get(platform, "orders-in")["status"]
        assert status["lag"] == 0 and status["delivered"] == 14 and status["failed"] == 2, status
        return status

    assert_eventually(caught_up, timeout_s=30, interval_s=0.5, message="lag 0 in `stoker trigger get`")
    triggers = platform.status()["triggers"]
    assert triggers["orders-in"]["lag"] == 0 and triggers["orders-in"]["state"] == "running"
    listed = orjson.loads(platform.stoker("trigger", "list", "--json").stdout)
    assert [t["name"] for t in listed] == ["orders-in"]

    # The invocation joined the source record's trace.
    def traced() -> bool:
        out = platform.stoker("trace", "4bf92f3577b34da6a3ce929d0e0e4736", check=False).stdout
        assert "trigger orders-in process" in out and "process dispatcher" in out and "stoker exec" in out, out
        return True

    assert_eventually(traced, timeout_s=30, interval_s=0.5, message="the trigger's spans in the source trace")

    # Paused: records wait (the lag shows them); resumed: they run.
    platform.stoker("trigger", "pause", "orders-in")
    assert_eventually(
        lambda: trigger_get(platform, "orders-in")["status"]["state"] == "paused", timeout_s=20, interval_s=0.5
    )
    produce(platform, "orders", [(b"later", orjson.dumps({"late": True}), [])])
    assert_eventually(
        lambda: trigger_get(platform, "orders-in")["status"]["lag"] == 1, timeout_s=20, interval_s=0.5,
        message="a paused trigger's lag counts the record waiting",
    )
    assert len(responses(platform, "orders.done")) == 14
    platform.stoker("trigger", "resume", "orders-in")
    assert_eventually(
        lambda: len(responses(platform, "orders.done")) == 15, timeout_s=60, interval_s=0.5, message="resumed"
    )
    platform.stoker("trigger", "delete", "orders-in")
    gone = platform.stoker("trigger", "get", "orders-in", check=False)
    assert gone.returncode != 0 and "no trigger" in gone.stderr


# ----- SIGKILL mid-batch ----------------------------------------------------------------------------------


def test_a_trigger_service_killed_mid_batch_loses_no_record(platform: Platform) -> None:
    total = 300
    make_topic(platform, "clicks", partitions=3)
    platform.stoker(
        "trigger", "create", "clicks-in", "--topic", "clicks", "--function", "tfn",
        "--response-topic", "clicks.done", "--error-topic", "clicks.failed", "--concurrency", "8", "--from", "earliest",
    )
    # Four records run for 25 s: still running when the killed copy's partitions are given out again
    # (its session ends after 10 s), so they are sent again, with the same ids, before their results
    # exist; the dispatcher collapses each into the run it holds.
    long_ones = {30, 31, 32, 33}
    produce(
        platform,
        "clicks",
        [(f"c{i}".encode(), orjson.dumps({"i": i, "sleep": 25.0 if i in long_ones else 0.1}), []) for i in range(300)],
    )

    def some_done() -> int:
        n = len(read_all(platform, "clicks.done"))
        assert 20 <= n < total * 0.8, n
        return n

    before_kill = assert_eventually(some_done, timeout_s=90, interval_s=0.2, message="the batch under way")
    old_pid = platform.pids()["trigger"]
    os.killpg(old_pid, signal.SIGKILL)

    def restarted() -> bool:
        row = platform.status()["services"]["trigger"]
        assert row["pid"] not in (None, old_pid) and row["ready"], row
        return True

    assert_eventually(restarted, timeout_s=60, interval_s=0.5, message="the trigger service started again")

    source_coordinates = {(r.partition, r.offset) for r in read_all(platform, "clicks")}
    assert len(source_coordinates) == total

    def every_record() -> list[dict[str, Any]]:
        done = responses(platform, "clicks.done")
        assert {(d["partition"], d["offset"]) for d in done} == source_coordinates, len(done)
        return done

    done = assert_eventually(every_record, timeout_s=180, interval_s=1.0, message="every record has a response")
    assert read_all(platform, "clicks.failed") == []
    repeated = {k: n for k, n in Counter((d["partition"], d["offset"]) for d in done).items() if n > 1}
    # Each response names the invocation that produced it: a record answered twice was answered by
    # one invocation id (the deterministic one), never by a second run under another id.
    for d in done:
        assert d["invocation"] == f"trg.clicks-in.clicks-{d['partition']}-{d['offset']}"
    # Answered twice: only records open at the kill (at most 64 per trigger copy) or recorded since
    # the last commit (0.2 s): their function did not run again (below), their result was found.
    assert len(repeated) <= 128, repeated
    invocations = Counter(
        orjson.loads(r.value)["id"]
        for r in read_all(platform, platform.settings.topics.invocation)
        if r.key == b"tfn" and b"trg.clicks-in." in r.value
    )
    results = read_all(platform, platform.settings.topics.result)
    runs = Counter(r.key.decode() for r in results if r.key.startswith(b"trg.clicks-in."))
    print(
        f"\nkill test: {total} records, {before_kill} responses before the SIGKILL, {len(done)} responses after "
        f"({len(repeated)} records answered twice), {sum(invocations.values())} invocation records for "
        f"{len(invocations)} ids, {sum(runs.values())} results for {len(runs)} ids"
    )
    assert set(runs) == set(invocations) and len(runs) == total
    assert all(n == 1 for n in runs.values()), {k: n for k, n in runs.items() if n > 1}  # one run per record
    resent = {i for i, n in invocations.items() if n > 1}
    assert resent, "no invocation was sent again: the kill did not catch a record running"
    platform.stoker("trigger", "delete", "clicks-in")


# ----- a cron trigger, fired once per slot by one of two copies ------------------------------------------


def test_a_cron_trigger_fires_each_slot_once_across_a_killed_copy_and_a_second_one(platform: Platform) -> None:
    settings = platform.settings
    platform.stoker(
        "trigger", "create", "tick", "--cron", "*/2 * * * * *", "--function", "tfn",
        "--payload", '{"job": "report"}', "--timezone", "Europe/Berlin",
    )

    def firings() -> list[dict[str, Any]]:
        out = []
        for rec in read_all(platform, settings.topics.invocation):
            if rec.key == b"tfn" and b'"cron.tick.' in rec.value:
                out.append(orjson.loads(rec.value))
        return out

    assert_eventually(lambda: len(firings()) >= 2, timeout_s=60, interval_s=0.5, message="the first firings")
    second = ServiceProcess(
        "services.trigger",
        "trigger-b",
        settings,
        extra_env={"STOKER_INSTANCE_NAME": "trigger-b", "STOKER_NODE_NAME": "management-0"},
    )
    try:
        assert second.wait_ready(timeout_s=60)["role"] == "standby"
        fired_before = len(firings())
        os.killpg(platform.pids()["trigger"], signal.SIGKILL)  # the copy that fires
        # Whichever copy holds the lease once the killed one's session ends (the second one, or the
        # killed one started again by the supervisor) fires on from the recorded slots.
        assert_eventually(
            lambda: len(firings()) >= fired_before + 3, timeout_s=90, interval_s=0.5, message="firing on"
        )

        def one_active() -> bool:
            names = ("trigger", "trigger-b")
            roles = [orjson.loads(ready_file(settings, n).read_bytes())["role"] for n in names]
            assert sorted(roles) == ["active", "standby"], roles
            return True

        assert_eventually(one_active, timeout_s=60, interval_s=0.5, message="one copy fires, the other stands by")
        platform.stoker("trigger", "pause", "tick")

        def nobody_fires() -> bool:
            copies = trigger_get(platform, "tick")["status"]["copies"]
            assert copies and all(c["state"] in ("paused", "standby") for c in copies.values()), copies
            return True

        assert_eventually(nobody_fires, timeout_s=30, interval_s=0.5, message="every copy saw the pause")
    finally:
        second.stop()
    fired = firings()
    ids = Counter(f["id"] for f in fired)
    assert all(n == 1 for n in ids.values()), [i for i, n in ids.items() if n > 1]
    slots = [f["payload"]["scheduled_ms"] for f in fired]
    assert all(s % 2000 == 0 for s in slots) and len(set(slots)) == len(slots)
    assert all(f["payload"]["payload"] == {"job": "report"} for f in fired)
    results = Counter(
        r.key.decode() for r in read_all(platform, settings.topics.result) if r.key.startswith(b"cron.tick.")
    )

    def each_once() -> bool:
        counted = Counter(
            r.key.decode() for r in read_all(platform, settings.topics.result) if r.key.startswith(b"cron.tick.")
        )
        assert set(counted) == set(ids) and all(n == 1 for n in counted.values()), (counted, ids)
        return True

    assert_eventually(each_once, timeout_s=60, interval_s=1.0, message="one result per slot")
    print(f"\ncron test: {len(fired)} slots fired, {len(ids)} distinct, {len(results)} with results")
    got = trigger_get(platform, "tick")
    assert got["kind"] == "cron" and got["paused"] is True and got["status"]["last_fired_ms"] == max(slots)
    platform.stoker("trigger", "delete", "tick")
