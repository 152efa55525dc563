"""Two pool managers on a real broker: one active, one standing by; the active one is SIGKILLed,
paused (and fenced when it comes back) or stopped (it hands over at once).

The test plays a node agent with records: it heartbeats, reads its work topic (read-committed,
as an agent does) and, for every Specialize, loads the instances a moment later (a heartbeat
listing them and ``instance.changed`` ready events). Prewarm requests are sent before and after
the kill; each must be acted on exactly once: one Specialize per request, one ``prewarm.started``
and one ``prewarm.completed`` (ready), whichever copy did it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from events import (
    CodeSource,
    EnsurePool,
    FunctionSpec,
    InstanceChanged,
    InstanceSummary,
    NodeCapacity,
    NodeHeartbeat,
    PrewarmCompleted,
    PrewarmRequested,
    PrewarmStarted,
    Record,
    Recycle,
    Specialize,
    codec,
)
from services.common.admin import ensure_topics
from services.common.settings import CommonSettings
from tests.helpers import ServiceProcess, eventually

NODE = "fake-0"
LOAD_S = 0.6
"""How long the fake node takes to load a function into an instance."""
WATCHED = (Recycle, Specialize, EnsurePool, PrewarmRequested, PrewarmStarted, PrewarmCompleted)


def _spec(name: str) -> FunctionSpec:
    digest = "sha256:" + name.encode().hex().ljust(64, "0")[:64]
    return FunctionSpec(name=name, entrypoint="handler:main", source=CodeSource(digest=digest))


class FakeNode:
    """A node agent made of records: heartbeats, and instances loaded for each Specialize."""

    def __init__(self, settings: CommonSettings) -> None:
        self.topics = settings.topics
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
        self.work = AIOKafkaConsumer(
            self.topics.work(NODE),
            bootstrap_servers=settings.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            isolation_level="read_committed",
            fetch_max_wait_ms=100,
        )
        self.instances: list[InstanceSummary] = [InstanceSummary(instance="g-1", state="generic")]
        self.pool_target = 2
        """What its heartbeat says its generic pool target is (the pool manager wants 2)."""
        self.incarnation = "inc-1"
        self.commands: list[Record] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._seq = 0
        self._n = 0

    async def start(self) -> None:
        await self.producer.start()
        await self.work.start()
        await self.heartbeat()
        self._tasks = [asyncio.create_task(self._beat()), asyncio.create_task(self._serve())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.work.stop()
        await self.producer.stop()

    async def heartbeat(self) -> None:
        self._seq += 1
        hb = NodeHeartbeat(
            node=NODE,
            incarnation=self.incarnation,
            labels={"stoker.io/role": "runtime"},
            capacity=NodeCapacity(max_instances=64),
            pool_target=self.pool_target,
            instances=list(self.instances),
            seq=self._seq,
        )
        await self.producer.send_and_wait(self.topics.node, codec.encode(hb), key=NODE.encode())

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            await self.heartbeat()

    async def _serve(self) -> None:
        while True:
            for records in (await self.work.getmany(timeout_ms=200)).values():
                for rec in records:
                    cmd = codec.decode(rec.value, WATCHED)
                    self.commands.append(cmd)
                    if isinstance(cmd, Specialize):
                        self._tasks.append(asyncio.create_task(self._load(cmd)))

    async def _load(self, cmd: Specialize) -> None:
        await asyncio.sleep(LOAD_S)  # loading the code takes a moment
        for _ in range(cmd.count):
            self._n += 1
            name = f"i-{self._n}"
            self.instances.append(
                InstanceSummary(
                    instance=name, state="ready", function=cmd.spec.name, function_version=cmd.spec.code_version
                )
            )
            event = InstanceChanged(
                node=NODE,
                incarnation="inc-1",
                instance=name,
                state="ready",
                function=cmd.spec.name,
                function_version=cmd.spec.code_version,
            )
            await self.producer.send_and_wait(self.topics.instance, codec.encode(event), key=NODE.encode())
        await self.heartbeat()


class PrewarmLog:
    """Every committed record of the prewarm topic."""

    def __init__(self, settings: CommonSettings) -> None:
        self.consumer = AIOKafkaConsumer(
            settings.topics.prewarm,
            bootstrap_servers=settings.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            isolation_level="read_committed",
            fetch_max_wait_ms=100,
        )
        self.records: list[Record] = []
        self.offsets: dict[int, Record] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        self._task = asyncio.create_task(self._collect())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.consumer.stop()

    async def _collect(self) -> None:
        while True:
            for records in (await self.consumer.getmany(timeout_ms=200)).values():
                for r in records:
                    record = codec.decode(r.value, WATCHED)
                    self.records.append(record)
                    self.offsets[r.offset] = record

    def of(self, kind: type[Record]) -> list[Any]:
        return [r for r in self.records if isinstance(r, kind)]


def _role(proc: ServiceProcess) -> str | None:
    try:
        return str(orjson.loads(proc.ready_file.read_bytes()).get("role"))
    except (OSError, orjson.JSONDecodeError):
        return None


@contextlib.contextmanager
def two_poolmgrs(settings: CommonSettings) -> Iterator[list[ServiceProcess]]:
    procs = [
        ServiceProcess("services.poolmgr", f"poolmgr-{i}", settings, {"STOKER_INSTANCE_NAME": f"poolmgr-{i}"})
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


def test_a_killed_active_pool_manager_is_replaced_and_every_prewarm_happens_once(
    stoker_settings: CommonSettings,
) -> None:
    settings = stoker_settings
    before = [f"before-{i}" for i in range(5)]
    after = [f"after-{i}" for i in range(4)]
    asyncio.run(ensure_topics(settings.bootstrap, [settings.topics.work_spec(NODE)]))

    async def scenario(procs: list[ServiceProcess]) -> dict[str, Any]:
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
        await producer.start()
        node = FakeNode(settings)
        prewarms = PrewarmLog(settings)
        try:
            for name in before + after:
                spec = _spec(name)
                await producer.send_and_wait(settings.topics.function, codec.encode(spec), key=name.encode())
            await node.start()
            await prewarms.start()

            async def one_active() -> ServiceProcess | None:
                active = [p for p in procs if _role(p) == "active"]
                standby = [p for p in procs if _role(p) == "standby"]
                return active[0] if len(active) == 1 and len(standby) == 1 else None

            active = await eventually(one_active, timeout_s=30, message="one active, one standby")
            assert active is not None
            survivor = next(p for p in procs if p is not active)

            async def request(name: str) -> None:
                record = PrewarmRequested(function=name, count=1, reason="test")
                await producer.send_and_wait(settings.topics.prewarm, codec.encode(record), key=name.encode())

            for name in before:
                await request(name)

            # Kill the active copy while it is in the middle of the prewarms sent so far.
            async def mid_way() -> bool:
                done = {r.function for r in prewarms.of(PrewarmCompleted)}
                started = {r.function for r in prewarms.of(PrewarmStarted)}
                return len(done) >= 2 and bool(started - done)

            await eventually(mid_way, timeout_s=30, message="some prewarms done, one under way")
            killed_at = time.monotonic()
            active.kill()
            for name in after:
                await request(name)

            async def taken_over() -> bool:
                return _role(survivor) == "active"

            await eventually(taken_over, timeout_s=30, message="the standby took over")
            took_over_s = time.monotonic() - killed_at

            async def all_completed() -> bool:
                return {r.function for r in prewarms.of(PrewarmCompleted)} >= set(before + after)

            await eventually(all_completed, timeout_s=60, message="every prewarm completed")
            all_done_s = time.monotonic() - killed_at
            # Settled: the survivor committed its position past every request and started record
            # (nothing is left for anyone to act on), and the node read its work topic to the end.
            consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id="stoker-poolmgr")
            await consumer.start()
            try:
                tp = TopicPartition(settings.topics.prewarm, 0)
                work = TopicPartition(settings.topics.work(NODE), 0)

                async def settled() -> bool:
                    acted_on = [o for o, r in prewarms.offsets.items() if not isinstance(r, PrewarmCompleted)]
                    committed = await consumer.committed(tp)
                    work_end = (await node.work.end_offsets([work]))[work]
                    return (
                        committed is not None
                        and committed > max(acted_on)
                        and (await node.work.position(work) >= work_end)
                    )

                await eventually(settled, timeout_s=30, message="the survivor committed past every request")
            finally:
                await consumer.stop()
            return {
                "took_over_s": took_over_s,
                "all_done_s": all_done_s,
                "commands": list(node.commands),
                "prewarm": list(prewarms.records),
            }
        finally:
            await prewarms.stop()
            await node.stop()
            await producer.stop()

    with two_poolmgrs(settings) as procs:
        outcome = asyncio.run(scenario(procs))
    specializes = Counter(c.spec.name for c in outcome["commands"] if isinstance(c, Specialize))
    started = Counter(r.function for r in outcome["prewarm"] if isinstance(r, PrewarmStarted))
    completed = [r for r in outcome["prewarm"] if isinstance(r, PrewarmCompleted)]
    print(
        f"failover: standby active {outcome['took_over_s']:.1f}s after the kill, "
        f"every prewarm done {outcome['all_done_s']:.1f}s after it; "
        f"{sum(specializes.values())} Specialize, {sum(started.values())} started, {len(completed)} completed"
    )
    names = before + after
    assert specializes == Counter(names), specializes
    assert started == Counter(names), started
    assert Counter(r.function for r in completed) == Counter(names)
    assert all(r.status == "ready" and r.ready == 1 for r in completed), completed


async def _one_active(procs: list[ServiceProcess]) -> ServiceProcess:
    async def check() -> ServiceProcess | None:
        active = [p for p in procs if _role(p) == "active"]
        standby = [p for p in procs if _role(p) == "standby"]
        return active[0] if len(active) == 1 and len(standby) == 1 else None

    found = await eventually(check, timeout_s=30, message="one active, one standby")
    assert found is not None
    return found


def test_a_paused_active_copy_is_fenced_when_it_comes_back_and_stands_by(stoker_settings: CommonSettings) -> None:
    settings = stoker_settings
    asyncio.run(ensure_topics(settings.bootstrap, [settings.topics.work_spec(NODE)]))

    async def scenario(procs: list[ServiceProcess]) -> list[Record]:
        node = FakeNode(settings)
        await node.start()
        try:
            paused = await _one_active(procs)
            survivor = next(p for p in procs if p is not paused)
            os.killpg(paused.proc.pid, signal.SIGSTOP)  # alive, but silent: its session expires
            try:

                async def taken_over() -> bool:
                    return _role(survivor) == "active"

                await eventually(taken_over, timeout_s=30, message="the standby took over")
                # Something for both to act on: the node restarted, with no pool. The paused copy still
                # believes it is active and will act on it as soon as it runs again.
                node.incarnation, node.pool_target = "inc-2", 0

                async def ensured() -> bool:
                    return any(isinstance(c, EnsurePool) for c in node.commands)

                await eventually(ensured, timeout_s=30, message="the new active copy set the pool")
            finally:
                os.killpg(paused.proc.pid, signal.SIGCONT)

            async def stands_by() -> bool:
                return _role(paused) == "standby" and _role(survivor) == "active"

            await eventually(stands_by, timeout_s=30, message="the paused copy came back as a standby")
            # The node has read everything on its work topic: no command of the old copy is left.
            work = TopicPartition(settings.topics.work(NODE), 0)

            async def read_to_the_end() -> bool:
                end = (await node.work.end_offsets([work]))[work]
                return await node.work.position(work) >= end

            await eventually(read_to_the_end, timeout_s=30, message="the node read its work topic")
            return list(node.commands)
        finally:
            await node.stop()

    with two_poolmgrs(settings) as procs:
        commands = asyncio.run(scenario(procs))
        paused_log = "\n".join(p.log() for p in procs)
    ensure = [c for c in commands if isinstance(c, EnsurePool)]
    assert ensure == [EnsurePool(incarnation="inc-2", generic=2)], ensure
    assert "lost the lease" in paused_log or "ProducerFenced" in paused_log


def test_a_stopped_active_copy_hands_over_at_once(stoker_settings: CommonSettings) -> None:
    settings = stoker_settings

    async def scenario(procs: list[ServiceProcess]) -> float:
        leaving = await _one_active(procs)
        survivor = next(p for p in procs if p is not leaving)
        began = time.monotonic()
        leaving.stop()  # SIGTERM: it leaves the lease group on its way out

        async def taken_over() -> bool:
            return _role(survivor) == "active"

        await eventually(taken_over, timeout_s=30, message="the standby took over")
        return time.monotonic() - began

    with two_poolmgrs(settings) as procs:
        took = asyncio.run(scenario(procs))
    print(f"handover after a clean stop: {took:.1f}s")
    # Well under the session timeout (6 s), which a copy that did not leave would cost.
    assert took < 4.0, took
