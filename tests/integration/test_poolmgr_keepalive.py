"""The pool manager's keep-alive policy as a real process on a real broker.

The test plays the rest of the platform with records: it publishes function specs, heartbeats of a
fake node and invocation results (with made-up times, so a 20-minute pattern needs no 20 minutes),
and reads the Recycle commands and PrewarmRequested records the pool manager publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from events import (
    CodeSource,
    EnsurePool,
    FunctionSpec,
    InstanceSummary,
    InvocationCompleted,
    NodeCapacity,
    NodeHeartbeat,
    PrewarmCompleted,
    PrewarmRequested,
    PrewarmStarted,
    Record,
    Recycle,
    Specialize,
    Timings,
    codec,
    now_ms,
)
from services.common.admin import ensure_topics
from services.common.settings import CommonSettings
from tests.helpers import ServiceProcess, eventually

NODE = "fake-0"
MIN_MS = 60_000
WATCHED = (Recycle, Specialize, EnsurePool, PrewarmRequested, PrewarmStarted, PrewarmCompleted)


def _spec(name: str, idle_s: float | None = None) -> FunctionSpec:
    digest = "sha256:" + name.encode().hex().ljust(64, "0")[:64]
    return FunctionSpec(name=name, entrypoint="handler:main", source=CodeSource(digest=digest), idle_s=idle_s)


def _ready(instance: str, spec: FunctionSpec, *, idle_s: float, uses: int) -> InstanceSummary:
    return InstanceSummary(
        instance=instance,
        state="ready",
        function=spec.name,
        function_version=spec.code_version,
        idle_ms=int(idle_s * 1000),
        uses=uses,
    )


class Platform:
    """Records in and out of the pool manager's topics."""

    def __init__(self, settings: CommonSettings) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.seen: list[Record] = []
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap)
        self.consumer = AIOKafkaConsumer(
            self.topics.work(NODE),
            self.topics.prewarm,
            bootstrap_servers=settings.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            isolation_level="read_committed",  # as an agent reads its work topic
            fetch_max_wait_ms=100,
        )
        self._task: asyncio.Task[None] | None = None
        self._seq = 0

    async def start(self) -> None:
        await self.producer.start()
        await self.consumer.start()
        self._task = asyncio.create_task(self._collect())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()
        await self.producer.stop()

    async def _collect(self) -> None:
        while True:
            for records in (await self.consumer.getmany(timeout_ms=200)).values():
                self.seen.extend(codec.decode(r.value, WATCHED) for r in records)

    async def send(self, topic: str, record: Record, key: str, partition: int | None = None) -> None:
        await self.producer.send_and_wait(topic, codec.encode(record), key=key.encode(), partition=partition)

    async def heartbeat(self, *instances: InstanceSummary) -> None:
        self._seq += 1
        generic = InstanceSummary(instance="g-1", state="generic")
        hb = NodeHeartbeat(
            node=NODE,
            incarnation="inc-1",
            labels={"stoker.io/role": "runtime"},  # eligible for functions' default node selector
            capacity=NodeCapacity(max_instances=8),
            pool_target=2,
            instances=[generic, *instances],
            seq=self._seq,
            interval_ms=60_000,  # stays live without a heartbeat every half second
        )
        await self.send(self.topics.node, hb, NODE)

    async def results(self, function: str, ends_ms: list[int]) -> None:
        for k, end in enumerate(ends_ms):
            result = InvocationCompleted(
                id=f"{function}-{k}-{end}",
                function=function,
                status="ok",
                timings_ms=Timings(total=200.0),
                completed_ms=end,
            )
            # One partition, so the pool manager reads them in this order: results of calls 20
            # minutes apart are never written at once in real life, which the test does here.
            await self.send(self.topics.result, result, result.id, partition=0)

    def recycles(self) -> dict[str, Recycle]:
        return {r.instance or "": r for r in self.seen if isinstance(r, Recycle)}

    def prewarm_requests(self, function: str) -> list[PrewarmRequested]:
        return [r for r in self.seen if isinstance(r, PrewarmRequested) and r.function == function]


@contextlib.contextmanager
def poolmgr(settings: CommonSettings, env: dict[str, str]) -> Iterator[ServiceProcess]:
    proc = ServiceProcess("services.poolmgr", "poolmgr", settings, {"STOKER_PREWARM_TIMEOUT_S": "2", **env})
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
        print(proc.log()[-4000:])


@contextlib.asynccontextmanager
async def platform(settings: CommonSettings, *specs: FunctionSpec) -> AsyncIterator[Platform]:
    await ensure_topics(settings.bootstrap, [settings.topics.work_spec(NODE)])
    p = Platform(settings)
    await p.start()
    try:
        for spec in specs:
            await p.send(settings.topics.function, spec, spec.name)
        yield p
    finally:
        await p.stop()


def _every_20_min(last_end_ms: int, n: int = 7) -> list[int]:
    return [last_end_ms - (n - 1 - k) * 20 * MIN_MS for k in range(n)]


def test_hybrid_learns_from_results_recycles_after_use_and_prewarms_before_the_next_call(
    stoker_settings: CommonSettings,
) -> None:
    tick, tock = _spec("tick"), _spec("tock")

    async def setup() -> None:
        async with platform(stoker_settings, tick, tock):
            pass  # the specs are on the function topic before the pool manager starts

    asyncio.run(setup())
    with poolmgr(stoker_settings, {}) as proc:  # hybrid is the default
        assert proc.wait_ready()["keepalive"] == "hybrid"

        async def scenario() -> None:
            async with platform(stoker_settings) as p:
                # Both called every 20 minutes (idle 19.997 minutes: bin 19), the last call 1100 s ago:
                # within the window (19 min - 10%, 20 min + 5%) from now on for a few minutes.
                last = now_ms() - 1100_000
                await p.results("tick", _every_20_min(last))
                await p.results("tock", _every_20_min(last))
                used = _ready("tick-a", tick, idle_s=2, uses=3)
                prewarmed = _ready("tock-p", tock, idle_s=1, uses=0)

                async def recycled_once_learned() -> Recycle | None:
                    await p.heartbeat(used, prewarmed)  # until the results are learned: the fallback keeps it
                    await asyncio.sleep(0.2)
                    return p.recycles().get("tick-a")

                recycle = await eventually(recycled_once_learned, timeout_s=30, message="hybrid recycle")
                assert recycle.incarnation == "inc-1"
                assert recycle.reason.startswith("keep-alive (hybrid): idle 2s, window 1026-1260s"), recycle.reason
                assert "histogram" in recycle.reason

                # tick-a is gone: the pool manager pre-warms tick (tock-p is loaded, in its window).
                await p.heartbeat(prewarmed)

                async def prewarm_of_tick_ended() -> bool:
                    return any(isinstance(r, PrewarmCompleted) and r.function == "tick" for r in p.seen)

                await eventually(prewarm_of_tick_ended, timeout_s=30, message="tick pre-warmed")
                (request,) = p.prewarm_requests("tick")
                assert request.count == 1 and not request.activate and request.digest is None
                assert request.reason.startswith("keep-alive policy: expected arrival in 0-"), request.reason
                specialize = [r for r in p.seen if isinstance(r, Specialize) and r.spec.name == "tick"]
                assert [(s.count, s.spec.code_version, s.incarnation) for s in specialize] == [
                    (1, tick.code_version, "inc-1")
                ]

                # tock-p goes too; its pre-warm comes from a later tick, which did not ask for tick again.
                await p.heartbeat()

                async def tock_requested() -> list[PrewarmRequested]:
                    return p.prewarm_requests("tock")

                await eventually(tock_requested, timeout_s=30, message="tock pre-warmed")
                assert len(p.prewarm_requests("tick")) == 1
                assert "tock-p" not in p.recycles()  # unused, in its function's window: it was kept

        asyncio.run(scenario())


def test_fixed_policy_and_a_functions_own_idle_s(stoker_settings: CommonSettings) -> None:
    plain, own = _spec("plain"), _spec("own", idle_s=5.0)

    async def setup() -> None:
        async with platform(stoker_settings, plain, own):
            pass

    asyncio.run(setup())
    env = {"STOKER_KEEPALIVE": "fixed", "STOKER_KEEPALIVE_FIXED_S": "30"}
    with poolmgr(stoker_settings, env) as proc:
        assert proc.wait_ready()["keepalive"] == "fixed"

        async def scenario() -> None:
            async with platform(stoker_settings) as p:
                await p.heartbeat(
                    _ready("plain-fresh", plain, idle_s=20, uses=1),
                    _ready("own-fresh", own, idle_s=4, uses=1),
                    _ready("plain-stale", plain, idle_s=31, uses=1),
                    _ready("own-stale", own, idle_s=6, uses=1),
                )

                async def both_recycled() -> dict[str, Any]:
                    got = p.recycles()
                    return got if {"plain-stale", "own-stale"} <= got.keys() else {}

                got = await eventually(both_recycled, timeout_s=30, message="fixed and idle_s recycles")
                # One heartbeat, its decisions published in instance order: the fresh ones would be here.
                assert set(got) == {"plain-stale", "own-stale"}
                assert got["plain-stale"].reason == "keep-alive (fixed): idle 31s, window 0-30s"
                assert got["own-stale"].reason == "keep-alive (idle_s=5): idle 6s, window 0-5s"

        asyncio.run(scenario())
