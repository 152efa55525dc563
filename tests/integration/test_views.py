"""The Reader against a real broker: one consumer for many views, read-your-writes, late views,
dead letters, replays, and a transaction's records only once it committed."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from events import BuildFinished, FunctionSpec, InvocationCompleted, Record
from events.codec import encode
from events.dlq import DeadLettered
from events.function import CodeSource
from services.common import views
from services.common.settings import CommonSettings
from services.common.views import Reader
from tests.helpers import eventually


def spec(name: str, revision: int = 1) -> FunctionSpec:
    return FunctionSpec(
        name=name, entrypoint="handler:main", source=CodeSource(kind="archive", digest="d", uri="u"), revision=revision
    )


def result(ident: str) -> InvocationCompleted:
    return InvocationCompleted(id=ident, function="f", status="ok")


async def producer(settings: CommonSettings) -> AIOKafkaProducer:
    out = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all", enable_idempotence=True, linger_ms=0)
    await out.start()
    return out


@pytest.fixture
def consumers(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every AIOKafkaConsumer the views module makes."""
    made: list[Any] = []
    real = views.AIOKafkaConsumer

    def counting(*args: Any, **kwargs: Any) -> Any:
        consumer = real(*args, **kwargs)
        made.append(consumer)
        return consumer

    monkeypatch.setattr(views, "AIOKafkaConsumer", counting)
    return made


def test_one_consumer_serves_every_view_with_read_your_writes(
    stoker_settings: CommonSettings, consumers: list[Any]
) -> None:
    topics = stoker_settings.topics

    async def scenario() -> None:
        out = await producer(stoker_settings)
        try:
            await out.send_and_wait(topics.function, encode(spec("before")), key=b"before")
            await out.send_and_wait(topics.build, encode(BuildFinished(function="old", build_id="b0", status="ok")))
            changes: list[tuple[str, str | None]] = []
            results: list[str] = []
            builds: list[str] = []
            reader = Reader(stoker_settings.bootstrap, "test")
            functions = reader.table(
                topics.function,
                (FunctionSpec,),
                on_change=lambda k, r: changes.append((k, r.name if r else None)),
            )
            reader.tail(topics.result, (InvocationCompleted,), lambda r: results.append(r.id))
            reader.tail(topics.build, (BuildFinished,), lambda b: builds.append(b.build_id), replay=True)
            await reader.start()
            try:
                # The table caught up and the replay read the topic before start returned.
                assert functions.get("before") is not None and builds == ["b0"]
                assert len(consumers) == 2  # the follower and the probe, for all three views
                follower = reader._consumer
                assert follower is not None
                assigned = {tp.topic for tp in follower.assignment()}
                assert assigned == {topics.function, topics.result, topics.build}
                for i in range(5):  # read-your-writes, again and again
                    await out.send_and_wait(topics.function, encode(spec(f"fn{i}")), key=f"fn{i}".encode())
                    assert await functions.wait_caught_up(timeout_s=5)
                    assert functions.get(f"fn{i}") is not None
                await out.send_and_wait(topics.function, None, key=b"fn0")  # a tombstone removes the row
                assert await functions.wait_caught_up(timeout_s=5)
                assert functions.get("fn0") is None and changes[-1] == ("fn0", None)
                await out.send_and_wait(topics.result, encode(result("r1")), key=b"r1")
                await out.send_and_wait(topics.build, encode(BuildFinished(function="new", build_id="b1", status="ok")))

                async def arrived() -> bool:
                    return results == ["r1"] and builds == ["b0", "b1"]

                await eventually(arrived, timeout_s=10)
                assert len(consumers) == 2
            finally:
                await reader.stop()
        finally:
            await out.stop()

    asyncio.run(scenario())


def test_views_added_after_start_and_on_a_topic_already_read(stoker_settings: CommonSettings) -> None:
    topics = stoker_settings.topics

    async def scenario() -> None:
        out = await producer(stoker_settings)
        reader = Reader(stoker_settings.bootstrap, "test")
        try:
            await out.send_and_wait(topics.result, encode(result("old")), key=b"old")
            changes: list[str] = []
            functions = reader.table(topics.function, (FunctionSpec,), on_change=lambda k, _r: changes.append(k))
            await reader.start()
            await out.send_and_wait(topics.function, encode(spec("a")), key=b"a")
            assert await functions.wait_caught_up(timeout_s=5)

            # A tail from the end, added later: nothing before it, everything after it.
            seen: list[str] = []
            late = reader.tail(topics.result, (InvocationCompleted,), lambda r: seen.append(r.id))
            await late.start()
            await out.send_and_wait(topics.result, encode(result("new")), key=b"new")
            # A second table of the topic the first one already follows: it reads it from the beginning;
            # the first one is not given its records again.
            again = reader.table(topics.function, (FunctionSpec,))
            await again.start()
            assert set(again.rows) == {"a"}
            # A replaying tail of the same result topic, with an async handler.
            replayed: list[str] = []

            async def keep(r: InvocationCompleted) -> None:
                await asyncio.sleep(0.01)
                replayed.append(r.id)

            replay = reader.tail(topics.result, (InvocationCompleted,), keep, replay=True)
            await replay.start()
            assert sorted(replayed) == ["new", "old"]  # two partitions: no order between them

            async def tail_saw_new() -> bool:
                return seen == ["new"]

            await eventually(tail_saw_new, timeout_s=10)
            await out.send_and_wait(topics.function, encode(spec("b")), key=b"b")
            assert await functions.wait_caught_up(timeout_s=5) and await again.wait_caught_up(timeout_s=5)
            assert changes == ["a", "b"]  # kept its position through every re-assignment
            assert set(again.rows) == {"a", "b"}

            # Stopping one view leaves the others reading.
            await again.stop()
            await replay.stop()
            await out.send_and_wait(topics.function, encode(spec("c")), key=b"c")
            await out.send_and_wait(topics.result, encode(result("newer")), key=b"newer")
            assert await functions.wait_caught_up(timeout_s=5) and functions.get("c") is not None
            assert "c" not in again.rows

            async def tail_saw_newer() -> bool:
                return seen == ["new", "newer"]

            await eventually(tail_saw_newer, timeout_s=10)
        finally:
            await reader.stop()
            await out.stop()

    asyncio.run(scenario())


def test_a_late_view_catches_up_without_waiting_for_the_long_poll(stoker_settings: CommonSettings) -> None:
    topics = stoker_settings.topics

    async def scenario() -> None:
        out = await producer(stoker_settings)
        # A long poll far longer than a late view may take to catch up.
        reader = Reader(stoker_settings.bootstrap, "test", fetch_max_wait_ms=5000)
        try:
            for i in range(50):
                await out.send_and_wait(topics.function, encode(spec(f"f{i}")), key=f"f{i}".encode())
                await out.send_and_wait(topics.result, encode(result(f"r{i}")), key=f"r{i}".encode())
            early = reader.table(topics.function, (FunctionSpec,))
            await reader.start()
            await asyncio.sleep(0.5)  # the follower's fetch is parked at the broker now
            began = time.monotonic()
            late = reader.table(topics.function, (FunctionSpec,))
            await late.start()
            seen: list[str] = []
            replay = reader.tail(topics.result, (InvocationCompleted,), lambda r: seen.append(r.id), replay=True)
            await replay.start()
            took = time.monotonic() - began
            assert len(late.rows) == 50 and sorted(seen) == sorted(f"r{i}" for i in range(50))
            assert took < 2.5, f"late views took {took:.2f}s"
            # The records the probe read are not handed over again by the follower.
            await out.send_and_wait(topics.function, encode(spec("after")), key=b"after")
            assert await late.wait_caught_up(timeout_s=10) and await early.wait_caught_up(timeout_s=10)
            assert len(late.rows) == len(early.rows) == 51
            # Several late views at once, some with nothing to read (as `stoker status` opens them).
            for _ in range(3):
                views = [reader.table(t, (Record,)) for t in (topics.function, topics.placement, topics.node)]
                await asyncio.gather(
                    *(v.start() for v in views), reader.tail(topics.build, (Record,), replay=True).start()
                )
                assert len(views[0].rows) == 51 and not views[1].rows
        finally:
            await reader.stop()
            await out.stop()

    asyncio.run(scenario())


def test_a_bad_record_is_dead_lettered_and_reading_goes_on(stoker_settings: CommonSettings) -> None:
    topics = stoker_settings.topics

    async def scenario() -> None:
        out = await producer(stoker_settings)
        letters: list[DeadLettered] = []

        async def sink(letter: DeadLettered) -> None:
            letters.append(letter)

        reader = Reader(stoker_settings.bootstrap, "test-service", dead_letters=sink)
        functions = reader.table(topics.function, (FunctionSpec,))
        keyed: list[str] = []
        reader.tail(topics.result, (InvocationCompleted,), lambda r: keyed.append(r.id), key="mine")
        try:
            await reader.start()
            await out.send_and_wait(topics.function, b"not json", key=b"broken")
            await out.send_and_wait(topics.function, b'{"type": "function.spec", "version": 1}', key=b"schema")
            await out.send_and_wait(topics.function, encode(spec("fine")), key=b"fine")
            await out.send_and_wait(topics.result, b"{}", key=b"other")  # not this tail's key: not looked at
            await out.send_and_wait(topics.result, encode(result("mine")), key=b"mine")
            assert await functions.wait_caught_up(timeout_s=5)
            assert set(functions.rows) == {"fine"}

            async def two_letters() -> bool:
                return len(letters) == 2 and keyed == ["mine"]

            await eventually(two_letters, timeout_s=10)
            broken, schema = letters
            assert (broken.source_topic, broken.key, broken.consumer) == (topics.function, "broken", "test-service")
            assert "JSON" in broken.reason and broken.value == "not json"
            assert "schema" in schema.reason and schema.key == "schema"
        finally:
            await reader.stop()
            await out.stop()

    asyncio.run(scenario())


def test_a_transaction_is_seen_once_it_committed(stoker_settings: CommonSettings) -> None:
    topics = stoker_settings.topics

    async def scenario() -> None:
        txn = AIOKafkaProducer(bootstrap_servers=stoker_settings.bootstrap, transactional_id="test-views-txn")
        await txn.start()
        reader = Reader(stoker_settings.bootstrap, "test")
        functions = reader.table(topics.function, (FunctionSpec,))
        try:
            await reader.start()
            async with txn.transaction():
                await txn.send_and_wait(topics.function, encode(spec("committed")), key=b"committed")
            await txn.begin_transaction()
            await txn.send_and_wait(topics.function, encode(spec("gone")), key=b"gone")
            await txn.abort_transaction()
            assert await functions.wait_caught_up(timeout_s=5)  # past the abort marker too
            assert functions.get("gone") is None and functions.get("committed") is not None
        finally:
            await reader.stop()
            await txn.stop()

    asyncio.run(scenario())
