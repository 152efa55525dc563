"""Dispatchers killed with queued and in-flight work: every accepted id still ends exactly once.

Real processes on the real broker: one node agent, one or two dispatchers in one consumer
group. A dispatcher is SIGKILLed while it holds invocations queued behind a function's
concurrency and others running on the node; its partitions' work is recovered by the next
owner (a restarted copy, or the other dispatcher after the group notices): from the ``dispatch``
topic, and, for work sent but not yet recorded there, from the Executes in the work topic. Each
test runs with running work recorded after 200 ms (the default) and with it never recorded, so
that everything in flight is found in the work topic. The results topic is read from its
beginning and counted per id.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from events import FunctionSpec, InvocationCompleted, InvocationRequested, Topics, codec
from services.common.admin import ensure_topics
from services.common.client import StokerClient, package_code
from services.common.settings import CommonSettings
from tests.helpers import RunningBroker, ServiceProcess

FNS = Path(__file__).parent / "fns"


@pytest.fixture
def settings(kafka_broker: RunningBroker, tmp_path: Path) -> Iterator[CommonSettings]:
    prefix = f"fo{uuid.uuid4().hex[:6]}."
    common = CommonSettings(home=tmp_path / "home", bootstrap=kafka_broker.bootstrap, topic_prefix=prefix)
    asyncio.run(ensure_topics(common.bootstrap, Topics(prefix).catalogue(invocation_partitions=4)))
    yield common


def dispatcher(settings: CommonSettings, name: str, record_after_s: str = "0.2") -> ServiceProcess:
    env = {"STOKER_INSTANCE_NAME": name, "STOKER_RECORD_AFTER_S": record_after_s}
    return ServiceProcess("services.dispatcher", name, settings, env)


RECORDING = pytest.mark.parametrize(
    "record_after_s",
    [
        pytest.param("0.2", id="running-work-recorded-after-200ms"),
        # Nothing in flight is ever recorded on dispatch: the next owner finds it in the work topics.
        pytest.param("600", id="running-work-found-in-work-topics"),
    ],
)


def agent(settings: CommonSettings) -> ServiceProcess:
    env = {"STOKER_NODE_NAME": "runtime-0", "STOKER_POOL_SIZE": "2", "STOKER_MAX_INSTANCES": "6"}
    return ServiceProcess("services.agent", "agent-runtime-0", settings, env)


def deploy(settings: CommonSettings, names: list[str], concurrency: int) -> None:
    async def go() -> None:
        async with StokerClient(settings) as client:
            source = package_code(settings, FNS / "probe")
            for name in names:
                spec = FunctionSpec(
                    name=name, entrypoint="handler:main", source=source, timeout_s=30, concurrency=concurrency
                )
                await client.put_function(spec)

    asyncio.run(go())


async def publish(settings: CommonSettings, invocations: list[InvocationRequested]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for inv in invocations:
            await producer.send_and_wait(settings.topics.invocation, codec.encode(inv), key=inv.function.encode())
    finally:
        await producer.stop()


def results_by_id(settings: CommonSettings, ids: set[str], timeout_s: float) -> dict[str, list[InvocationCompleted]]:
    """Every result record of ``ids`` from the beginning of the topic, until each has one (or the timeout)."""

    async def go() -> dict[str, list[InvocationCompleted]]:
        consumer = AIOKafkaConsumer(
            settings.topics.result,
            bootstrap_servers=settings.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
        )
        await consumer.start()
        seen: dict[str, list[InvocationCompleted]] = {}
        deadline = time.monotonic() + timeout_s
        settle_until: float | None = None
        try:
            while time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for rec in records:
                        result = codec.decode(rec.value, (InvocationCompleted,))
                        assert isinstance(result, InvocationCompleted)
                        if result.id in ids:
                            seen.setdefault(result.id, []).append(result)
                if settle_until is None and set(seen) >= ids:
                    settle_until = time.monotonic() + 3.0  # keep reading a little: a duplicate would show now
                if settle_until is not None and time.monotonic() > settle_until:
                    break
        finally:
            await consumer.stop()
        return seen

    return asyncio.run(go())


def wait_until_each_owns_partitions(*copies: ServiceProcess, timeout_s: float = 30.0) -> None:
    """Until the group has settled with every copy owning some partitions (a rebalance under the
    load would make every copy record its work on the way out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        owned = [re.findall(r"owned now \[([0-9, ]*)\]", c.log()) for c in copies]
        if all(found and found[-1] for found in owned):
            return
        time.sleep(0.2)
    raise AssertionError("the dispatchers did not settle into one group:\n" + "\n---\n".join(c.log() for c in copies))


def found_in_work_topics(log: str) -> int:
    """How many in-flight invocations the recoveries in ``log`` found only by their Execute."""
    return sum(int(n) for n in re.findall(r"(\d+) of them found in the work topics", log))


def assert_exactly_once(seen: dict[str, list[InvocationCompleted]], ids: set[str], logs: str) -> None:
    missing = ids - set(seen)
    twice = {i: [r.status for r in rs] for i, rs in seen.items() if len(rs) > 1}
    assert not missing, f"{len(missing)} of {len(ids)} ids have no result\n{logs}"
    assert not twice, f"ids with more than one result: {twice}\n{logs}"
    statuses = Counter(rs[0].status for rs in seen.values())
    assert statuses == Counter({"ok": len(ids)}), f"{statuses}\n{logs}"


@RECORDING
def test_a_restarted_dispatcher_finishes_what_it_had_queued_and_in_flight(
    settings: CommonSettings, record_after_s: str
) -> None:
    node = agent(settings)
    first = dispatcher(settings, "dispatcher-0", record_after_s)
    second: ServiceProcess | None = None
    try:
        first.wait_ready()
        node.wait_ready()
        deploy(settings, ["slow"], concurrency=1)
        # The first still runs when the restarted copy takes over (the group waits out the killed
        # member's 10 s session first); five wait behind the concurrency of 1.
        calls = [InvocationRequested(function="slow", payload={"action": "sleep", "seconds": 15.0})]
        calls += [InvocationRequested(function="slow", payload={"action": "sleep", "seconds": 0.5}) for _ in range(5)]
        asyncio.run(publish(settings, calls))
        ids = {c.id for c in calls}
        time.sleep(1.2)
        first.kill()
        second = dispatcher(settings, "dispatcher-0", record_after_s)
        second.wait_ready()
        seen = results_by_id(settings, ids, timeout_s=60)
        assert_exactly_once(seen, ids, first.log() + "\n---\n" + second.log() + "\n---\n" + node.log())
        assert "recovered partitions" in second.log()
        if record_after_s == "600":
            assert found_in_work_topics(second.log()) >= 1, second.log()
    finally:
        if second is not None:
            second.stop()
        first.stop()
        node.stop()


@RECORDING
def test_one_of_two_dispatchers_killed_under_load_loses_nothing(settings: CommonSettings, record_after_s: str) -> None:
    node = agent(settings)
    names = [f"fn{i}" for i in range(8)]  # spread over the four partitions, so both dispatchers own some
    a, b = dispatcher(settings, "dispatcher-0", record_after_s), dispatcher(settings, "dispatcher-1", record_after_s)
    try:
        a.wait_ready()
        b.wait_ready()
        node.wait_ready()
        wait_until_each_owns_partitions(a, b)
        deploy(settings, names, concurrency=1)

        async def load() -> list[InvocationRequested]:
            sent: list[InvocationRequested] = []
            for i in range(120):  # ~40/s for 3 s, each 0.2 s long: queues form behind a concurrency of 1
                # The first call of each function runs 16 s: sent at once, so in the variant that
                # records nothing it is on no dispatch record, and still running at the takeover.
                seconds = 16.0 if i < len(names) else 0.2
                inv = InvocationRequested(
                    function=names[i % len(names)], payload={"action": "sleep", "seconds": seconds}
                )
                await publish(settings, [inv])
                sent.append(inv)
                if i == 40:
                    a.kill()  # mid-load: it holds queued and in-flight invocations
                await asyncio.sleep(0.025)
            return sent

        calls = asyncio.run(load())
        ids = {c.id for c in calls}
        seen = results_by_id(settings, ids, timeout_s=90)
        assert_exactly_once(seen, ids, a.log() + "\n---\n" + b.log() + "\n---\n" + node.log())
        assert "recovered partitions" in b.log()  # the survivor took over the killed one's partitions
        if record_after_s == "600":
            assert found_in_work_topics(b.log()) >= 1, b.log()
    finally:
        a.stop()
        b.stop()
        node.stop()
