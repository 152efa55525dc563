"""Dispatcher + node agent as real processes on a real broker: the invocation path and its faults."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from events import FunctionSpec, InvocationCompleted, InvocationRequested, Topics, codec, now_ms
from services.common.admin import ensure_topics
from services.common.client import StokerClient, package_code
from services.common.settings import CommonSettings
from tests.helpers import RunningBroker, ServiceProcess, eventually

FNS = Path(__file__).parent / "fns"


@pytest.fixture(scope="module")
def platform(kafka_broker: RunningBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CommonSettings]:
    prefix = f"ip{uuid.uuid4().hex[:6]}."
    settings = CommonSettings(
        home=tmp_path_factory.mktemp("home"), bootstrap=kafka_broker.bootstrap, topic_prefix=prefix
    )
    topics = Topics(prefix)
    asyncio.run(ensure_topics(settings.bootstrap, topics.catalogue(invocation_partitions=2)))
    dispatcher = ServiceProcess("services.dispatcher", "dispatcher", settings)
    agent = ServiceProcess(
        "services.agent",
        "agent-runtime-0",
        settings,
        {"STOKER_NODE_NAME": "runtime-0", "STOKER_POOL_SIZE": "1", "STOKER_MAX_INSTANCES": "3"},
    )
    try:
        dispatcher.wait_ready()
        agent.wait_ready()

        async def deploy() -> None:
            async with StokerClient(settings) as client:
                source = package_code(settings, FNS / "probe")
                await client.put_function(
                    FunctionSpec(name="probe", entrypoint="handler:main", source=source, timeout_s=1.0)
                )
                await client.put_function(FunctionSpec(name="probe-async", entrypoint="handler:amain", source=source))

        asyncio.run(deploy())
        yield settings
    finally:
        agent.stop()
        dispatcher.stop()
        print(dispatcher.log()[-2000:], agent.log()[-2000:])


def invoke(settings: CommonSettings, function: str, payload: Any = None, **kwargs: Any) -> InvocationCompleted:
    async def go() -> InvocationCompleted:
        async with StokerClient(settings) as client:
            return await client.invoke(function, payload, timeout_s=30, **kwargs)

    return asyncio.run(go())


def test_first_call_specializes_a_pool_instance_then_reuses_it(platform: CommonSettings) -> None:
    first = invoke(platform, "probe", {"action": "echo", "n": 1})
    second = invoke(platform, "probe", {"action": "echo", "n": 2})
    assert first.status == "ok", first
    assert first.start in ("pool", "spawn") and second.start == "warm"
    assert first.output["echo"] == {"action": "echo", "n": 1}
    assert first.output["pid"] == second.output["pid"]  # the same instance, reused (keep)
    assert second.output["calls"] == first.output["calls"] + 1
    assert second.node == "runtime-0" and second.instance == first.instance
    t = second.timings_ms
    assert t.total >= t.exec > 0 and t.total >= t.queue


def test_async_handler(platform: CommonSettings) -> None:
    result = invoke(platform, "probe-async", {"a": 1})
    assert result.status == "ok" and result.output == {"async": True, "event": {"a": 1}}


def test_function_error_is_a_terminal_error_result(platform: CommonSettings) -> None:
    result = invoke(platform, "probe", {"action": "raise"})
    assert result.status == "error"
    assert result.error and result.error.kind == "ValueError" and "boom" in result.error.message
    assert result.error.traceback and "handler.py" in result.error.traceback


def test_timeout_kills_instance_and_node_keeps_serving(platform: CommonSettings) -> None:
    before = invoke(platform, "probe", {"action": "echo"})
    slow = invoke(platform, "probe", {"action": "sleep", "seconds": 5})
    assert slow.status == "timeout" and slow.error and slow.error.kind == "timeout"
    after = invoke(platform, "probe", {"action": "echo"})
    assert after.status == "ok" and after.output["pid"] != before.output["pid"]


def test_dying_process_is_an_error_and_node_keeps_serving(platform: CommonSettings) -> None:
    died = invoke(platform, "probe", {"action": "exit"})
    assert died.status == "error" and died.error and died.error.kind == "instance_died"
    assert "exited with code 3" in died.error.message
    assert invoke(platform, "probe", {"action": "echo"}).status == "ok"


def test_expired_deadline_is_not_run(platform: CommonSettings) -> None:
    result = invoke(platform, "probe", {"action": "echo"}, deadline_ms=now_ms() - 1)
    assert result.status == "timeout" and result.error and result.error.kind == "deadline_passed"


def test_unknown_function_is_rejected(platform: CommonSettings) -> None:
    result = invoke(platform, "no-such-fn", {})
    assert result.status == "rejected" and result.error and result.error.kind == "unknown_function"


async def _results_for(settings: CommonSettings, ids: set[str], settle_s: float, expect: int) -> list[Any]:
    """Every result record with one of ``ids`` on the result topic (read from the beginning)."""
    consumer = AIOKafkaConsumer(
        settings.topics.result,
        bootstrap_servers=settings.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    found: list[Any] = []
    try:

        async def enough() -> bool:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                found.extend(codec.decode(r.value) for r in records if codec.loads(r.value)["id"] in ids)
            return len(found) >= expect

        await eventually(enough, timeout_s=30, message=f"{expect} results")
        await asyncio.sleep(settle_s)  # nothing more may arrive: exactly one result each
        batches = await consumer.getmany(timeout_ms=500)
        for records in batches.values():
            found.extend(codec.decode(r.value) for r in records if codec.loads(r.value)["id"] in ids)
    finally:
        await consumer.stop()
    return found


def test_raw_kafka_client_and_duplicates_get_exactly_one_result(platform: CommonSettings) -> None:
    """Any Kafka client may publish the documented record; a repeated id runs once."""
    inv_id = uuid.uuid4().hex
    raw = (
        b'{"type": "invocation.requested", "version": 1, "id": "'
        + inv_id.encode()
        + b'", "function": "probe", "payload": {"action": "echo"}, "reply_to": null, "deadline_ms": null}'
    )

    async def go() -> list[Any]:
        producer = AIOKafkaProducer(bootstrap_servers=platform.bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(platform.topics.invocation, raw, key=b"probe")
            await producer.send_and_wait(platform.topics.invocation, raw, key=b"probe")
        finally:
            await producer.stop()
        return await _results_for(platform, {inv_id}, settle_s=1.5, expect=1)

    results = asyncio.run(go())
    assert len(results) == 1, results
    assert results[0].status == "ok" and results[0].output["id"] == inv_id


def test_undecodable_records_go_to_the_dead_letter_topic(platform: CommonSettings) -> None:
    async def go() -> tuple[list[Any], InvocationCompleted]:
        dlq = AIOKafkaConsumer(
            platform.topics.dlq,
            bootstrap_servers=platform.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await dlq.start()
        producer = AIOKafkaProducer(bootstrap_servers=platform.bootstrap)
        await producer.start()
        try:
            garbage = await producer.send_and_wait(platform.topics.invocation, b"\xff not json", key=b"probe")
            invalid = await producer.send_and_wait(
                platform.topics.invocation, b'{"type": "invocation.requested", "version": 1}', key=b"probe"
            )
            # A bad spec on the compacted function topic: every service skips it, one reports it.
            bad_spec = await producer.send_and_wait(
                platform.topics.function, b'{"type": "function.spec", "version": 1, "name": "Bad Name"}', key=b"bad"
            )
            letters: list[Any] = []

            async def both() -> bool:
                for records in (await dlq.getmany(timeout_ms=200)).values():
                    letters.extend(codec.decode(r.value) for r in records)
                return len(letters) >= 3

            await eventually(both, timeout_s=20, message="three dead letters")
        finally:
            await producer.stop()
            await dlq.stop()
        # The consumer carried on: a valid invocation after the bad ones still runs.
        async with StokerClient(platform) as client:
            after = await client.invoke("probe", {"action": "echo"}, timeout_s=20)
        by_offset = {(d.source_topic, d.partition, d.offset): d for d in letters}
        g = by_offset[(platform.topics.invocation, garbage.partition, garbage.offset)]
        i = by_offset[(platform.topics.invocation, invalid.partition, invalid.offset)]
        assert g.source_topic == platform.topics.invocation and "not valid JSON" in g.reason
        assert g.value_b64 is not None  # the exact bytes are kept when they are not UTF-8
        assert "function" in i.reason and i.key == "probe" and i.consumer == "dispatcher"
        spec_letter = [d for d in letters if d.source_topic == platform.topics.function]
        assert len(spec_letter) == 1 and spec_letter[0].offset == bad_spec.offset
        assert "name" in spec_letter[0].reason and "entrypoint" in spec_letter[0].reason
        return letters, after

    _letters, after = asyncio.run(go())
    assert after.status == "ok"


def test_concurrency_limit_queues_instead_of_failing(platform: CommonSettings) -> None:
    async def go() -> list[InvocationCompleted]:
        async with StokerClient(platform) as client:
            spec = (await client.functions())["probe"]
            await client.put_function(spec.model_copy(update={"name": "probe-one", "concurrency": 1}))
            calls = [client.invoke("probe-one", {"action": "sleep", "seconds": 0.3}, timeout_s=30) for _ in range(3)]
            return list(await asyncio.gather(*calls))

    results = asyncio.run(go())
    assert [r.status for r in results] == ["ok"] * 3
    # One at a time: the instance that ran them is the same process, never two at once.
    assert len({r.output["pid"] for r in results}) == 1


def test_invocation_model_is_the_documented_contract() -> None:
    inv = InvocationRequested(function="hello", payload={"any": "json"})
    assert set(codec.loads(codec.encode(inv))) >= {
        "type",
        "version",
        "id",
        "function",
        "payload",
        "reply_to",
        "deadline_ms",
    }
