"""Two workflow engines on a real broker, one SIGKILLed mid-run under a stream of runs.

The test plays the dispatcher and the nodes with records: it starts runs the way the dispatcher
forwards them (``workflow-invocation``), reads the step invocations the engine asks for
(read-committed, as the dispatcher does) and answers each on its reply topic a moment later.
Every run must end with exactly one result on the result topic, and no step may be asked for
twice, whichever copy asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from events import InvocationCompleted, InvocationRequested, codec
from services.common.settings import CommonSettings
from services.workflow import dsl
from tests.helpers import ServiceProcess, eventually

FLOW = """
prewarm: false
steps:
  - id: first
    function: step
    input: {n: $.input.n}
  - id: fan
    function: step
    after: [first]
    map: $.input.items
    input: {item: $.item}
  - id: last
    function: step
    after: [fan]
    input: {n: $.steps.first.output.n}
output:
  n: $.steps.last.output.n
  items: "$.steps.fan.output[*].item"
"""
RUNS = 24
STEP_S = 0.3
"""How long each fake step takes."""


class FakePlatform:
    """Answers every step invocation on its reply topic after ``STEP_S``; collects results."""

    def __init__(self, settings: CommonSettings) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")

        def consumer(topic: str) -> AIOKafkaConsumer:
            return AIOKafkaConsumer(
                topic,
                bootstrap_servers=settings.bootstrap,
                auto_offset_reset="earliest",
                enable_auto_commit=False,
                isolation_level="read_committed",
                fetch_max_wait_ms=100,
            )

        self.steps = consumer(self.topics.invocation)
        self.results = consumer(self.topics.result)
        self.requested: Counter[str] = Counter()
        self.finished: dict[str, list[InvocationCompleted]] = {}
        self.last_step_at = 0.0
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        await self.producer.start()
        await self.steps.start()
        await self.results.start()
        self._tasks = [asyncio.create_task(self._answer()), asyncio.create_task(self._collect())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.steps.stop()
        await self.results.stop()
        await self.producer.stop()

    async def run(self, run_id: str, n: int) -> None:
        inv = InvocationRequested(id=run_id, function="flow", payload={"n": n, "items": [n, n + 1]})
        await self.producer.send_and_wait(self.topics.workflow_invocation, codec.encode(inv), key=b"flow")

    async def _answer(self) -> None:
        while True:
            for records in (await self.steps.getmany(timeout_ms=200)).values():
                for rec in records:
                    inv = codec.decode(rec.value, (InvocationRequested,))
                    assert isinstance(inv, InvocationRequested)
                    self.requested[inv.id] += 1
                    self.last_step_at = time.monotonic()
                    if self.requested[inv.id] == 1:  # the platform runs an id once
                        self._tasks.append(asyncio.create_task(self._reply(inv)))

    async def _reply(self, inv: InvocationRequested) -> None:
        await asyncio.sleep(STEP_S)  # the step runs
        result = InvocationCompleted(id=inv.id, function=inv.function, status="ok", output=inv.payload)
        assert inv.reply_to is not None
        await self.producer.send_and_wait(inv.reply_to, codec.encode(result), key=inv.id.encode())

    async def _collect(self) -> None:
        while True:
            for records in (await self.results.getmany(timeout_ms=200)).values():
                for rec in records:
                    result = codec.decode(rec.value, (InvocationCompleted,))
                    assert isinstance(result, InvocationCompleted)
                    self.finished.setdefault(result.id, []).append(result)


def _role(proc: ServiceProcess) -> str | None:
    try:
        return str(orjson.loads(proc.ready_file.read_bytes()).get("role"))
    except (OSError, orjson.JSONDecodeError):
        return None


@contextlib.contextmanager
def two_engines(settings: CommonSettings) -> Iterator[list[ServiceProcess]]:
    procs = [
        ServiceProcess("services.workflow", f"workflow-{i}", settings, {"STOKER_INSTANCE_NAME": f"workflow-{i}"})
        for i in range(2)
    ]
    try:
        for proc in procs:
            proc.wait_ready()
        yield procs
    finally:
        for proc in procs:
            proc.stop()
            print(f"--- {proc.component} ---\n{proc.log()[-5000:]}")


async def _committed_to_the_end(settings: CommonSettings, group: str, topic: str) -> bool:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=group, isolation_level="read_committed")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not tps:
            consumer._client.add_topic(topic)  # noqa: SLF001 - metadata for a topic not subscribed
            await consumer._client.force_metadata_update()  # noqa: SLF001
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            committed = await consumer.committed(tp)
            if ends[tp] > 0 and (committed or 0) < ends[tp]:
                return False
        return bool(tps)
    finally:
        await consumer.stop()


def test_a_killed_active_engine_is_replaced_and_every_run_ends_exactly_once(stoker_settings: CommonSettings) -> None:
    settings = stoker_settings
    spec = dsl.load("flow", FLOW, lambda _name: True)

    async def scenario(procs: list[ServiceProcess]) -> dict[str, Any]:
        fake = FakePlatform(settings)
        await fake.start()
        try:
            await fake.producer.send_and_wait(settings.topics.workflow, codec.encode(spec), key=b"flow")

            async def one_active() -> ServiceProcess | None:
                active = [p for p in procs if _role(p) == "active"]
                standby = [p for p in procs if _role(p) == "standby"]
                return active[0] if len(active) == 1 and len(standby) == 1 else None

            active = await eventually(one_active, timeout_s=30, message="one active, one standby")
            assert active is not None
            survivor = next(p for p in procs if p is not active)
            ids = [f"run-{i}" for i in range(RUNS)]

            async def stream() -> None:
                for i, run_id in enumerate(ids):
                    await fake.run(run_id, i)
                    await asyncio.sleep(0.1)  # a stream of runs, not one burst

            streaming = asyncio.create_task(stream())

            # Mid-run: some runs ended, others have steps asked for and not ended yet.
            async def mid_way() -> bool:
                under_way = {step.split(".")[0] for step in fake.requested} - set(fake.finished)
                return len(fake.finished) >= 2 and len(under_way) >= 3

            await eventually(mid_way, timeout_s=30, message="runs under way")
            killed_at = time.monotonic()
            active.kill()
            await streaming

            async def taken_over() -> bool:
                return _role(survivor) == "active"

            await eventually(taken_over, timeout_s=30, message="the standby took over")
            took_over_s = time.monotonic() - killed_at

            async def all_ended() -> bool:
                return set(fake.finished) >= set(ids)

            await eventually(all_ended, timeout_s=90, message="every run ended")
            all_done_s = time.monotonic() - killed_at

            # Settled: the survivor has read and committed every run start and step result, and
            # the fake platform has read every step invocation: nothing is left to act on.
            async def settled() -> bool:
                for group, topic in (
                    ("stoker-workflow", settings.topics.workflow_invocation),
                    ("stoker-workflow-steps", settings.topics.reply("workflow-engine")),
                ):
                    if not await _committed_to_the_end(settings, group, topic):
                        return False
                ends = await fake.steps.end_offsets(list(fake.steps.assignment()))
                return all([await fake.steps.position(tp) >= end for tp, end in ends.items()])

            await eventually(settled, timeout_s=30, message="the survivor committed everything it read")
            return {
                "ids": ids,
                "took_over_s": took_over_s,
                "all_done_s": all_done_s,
                "finished": dict(fake.finished),
                "requested": Counter(fake.requested),
            }
        finally:
            await fake.stop()

    with two_engines(settings) as procs:
        outcome = asyncio.run(scenario(procs))
    finished: dict[str, list[InvocationCompleted]] = outcome["finished"]
    requested: Counter[str] = outcome["requested"]
    print(
        f"failover: standby active {outcome['took_over_s']:.1f}s after the kill, every run ended "
        f"{outcome['all_done_s']:.1f}s after it; {sum(len(v) for v in finished.values())} results for "
        f"{len(outcome['ids'])} runs, {sum(requested.values())} step requests for {len(requested)} step ids"
    )
    assert {run_id: len(finished[run_id]) for run_id in outcome["ids"]} == {run_id: 1 for run_id in outcome["ids"]}
    for i, run_id in enumerate(outcome["ids"]):
        (result,) = finished[run_id]
        assert result.status == "ok", result
        assert result.output == {"n": i, "items": [i, i + 1]}, result.output
    assert len(requested) == RUNS * 4  # first, two map items, last
    assert max(requested.values()) == 1, [k for k, v in requested.items() if v > 1]
