"""services.poolmgr.handlers with a real PoolManager over fake views and a fake writer."""

from __future__ import annotations

import asyncio
from typing import Any

from events import (
    EnsurePool,
    InstanceChanged,
    InstanceSummary,
    NodeCapacity,
    NodeHeartbeat,
    NodeStopped,
    PrewarmCompleted,
    PrewarmRequested,
    Record,
    Topics,
    now_ms,
)
from events.dlq import DeadLettered
from services.common.leadership import Ack, Consumed
from services.poolmgr import handlers
from services.poolmgr.core import PoolManager
from services.poolmgr.keepalive import FixedPolicy
from services.poolmgr.policy import ArrivalBook, PoolPolicy
from tests.unit.test_poolmgr_core import FakeView, FakeWriter, _spec  # the core's fakes: one copy

TOPICS = Topics("t.")


def _beat(node: str = "n1", at_ms: int | None = None, interval_ms: int = 2_000) -> NodeHeartbeat:
    return NodeHeartbeat(
        node=node,
        incarnation=f"{node}-inc",
        labels={"stoker.io/role": "runtime"},
        capacity=NodeCapacity(max_instances=8),
        pool_target=0,
        instances=[InstanceSummary(instance="g-1", state="generic")],
        interval_ms=interval_ms,
        at_ms=now_ms() if at_ms is None else at_ms,
    )


def _manager(writer: FakeWriter, nodes: FakeView | None = None) -> PoolManager:
    policy = PoolPolicy(generic_per_node=2, keepalive=FixedPolicy(600.0))
    return PoolManager(
        TOPICS,
        policy,
        writer,
        functions=FakeView({"hello": _spec()}),
        nodes=nodes or FakeView(),
        overrides=FakeView(),
        arrivals=ArrivalBook(policy.keepalive),
        prewarm_timeout_s=0.05,
    )


def _at(record: Record | None, offset: int, reason: str = "") -> Consumed:
    return Consumed(
        record=record,
        reason=reason,
        group=handlers.GROUP,
        topic=TOPICS.prewarm,
        partition=0,
        offset=offset,
        key=b"hello",
        value=b"{}",
        headers=(),
    )


async def _run_until(loop: Any, done: Any, timeout_s: float = 2.0) -> None:
    task = asyncio.ensure_future(loop)
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not done():
            assert asyncio.get_running_loop().time() < deadline, "the condition never held"
            await asyncio.sleep(0.005)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_standby_relay_drops_what_it_is_handed() -> None:
    relay = handlers.Relay()
    relay.node("n1", _beat())
    relay.instance(InstanceChanged(node="n1", incarnation="n1-inc", instance="i-1", state="ready"))
    assert relay.nodes is None and relay.core is None


def test_a_terms_relay_queues_node_changes_in_order() -> None:
    async def scenario() -> None:
        relay = handlers.Relay()
        relay.nodes = asyncio.Queue()
        first, stopped = _beat(), NodeStopped(node="n1", incarnation="n1-inc")
        relay.node("n1", first)
        relay.node("n1", stopped)
        assert [relay.nodes.get_nowait(), relay.nodes.get_nowait()] == [("n1", first), ("n1", stopped)]

    asyncio.run(scenario())


def test_followed_nodes_get_their_pool_and_a_stop_forgets_it() -> None:
    async def scenario() -> None:
        writer = FakeWriter()
        core = _manager(writer)
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        queue.put_nowait(("n1", _beat()))
        await _run_until(handlers.follow_nodes(core, queue), lambda: queue.empty() and writer.calls)
        [ensure] = writer.records(EnsurePool)
        assert (ensure.incarnation, ensure.generic) == ("n1-inc", 2)
        assert core.told == {"n1": ("n1-inc", 2)}
        queue.put_nowait(("n1", NodeStopped(node="n1", incarnation="n1-inc")))
        await _run_until(handlers.follow_nodes(core, queue), lambda: not core.told)

    asyncio.run(scenario())


def test_a_replayed_heartbeat_of_a_node_long_silent_is_ignored() -> None:
    async def scenario() -> None:
        writer = FakeWriter()
        core = _manager(writer)
        # Three of its 2 s intervals have passed: the node is down (events.node.node_up).
        await core.on_node("n1", _beat(at_ms=now_ms() - 6_500))
        assert writer.calls == [] and core.told == {}
        await core.on_node("n1", _beat(at_ms=now_ms() - 5_500))
        assert len(writer.records(EnsurePool)) == 1

    asyncio.run(scenario())


def test_the_intake_handles_the_prewarm_topic_in_order_and_dead_letters_what_it_cannot_read() -> None:
    async def scenario() -> None:
        writer = FakeWriter()
        core = _manager(writer, FakeView({"n1": _beat()}))
        batches = [[_at(None, 3, reason="not a record"), _at(PrewarmRequested(function="nope"), 4)]]

        async def batch() -> list[Consumed]:
            await asyncio.sleep(0.005)  # as a real reader waits for records
            return batches.pop(0) if batches else []

        await _run_until(handlers.intake(core, batch), lambda: len(writer.calls) == 2)
        (dlq, dlq_acks), (failed, failed_acks) = writer.calls
        assert isinstance(dlq[0].record, DeadLettered) and dlq[0].topic == TOPICS.dlq
        assert dlq_acks == [Ack(handlers.GROUP, TOPICS.prewarm, 0, 4)]
        completed = failed[0].record
        assert isinstance(completed, PrewarmCompleted) and completed.status == "failed"
        assert failed_acks == [Ack(handlers.GROUP, TOPICS.prewarm, 0, 5)]

    asyncio.run(scenario())


def test_the_keepalive_loop_ticks_the_core() -> None:
    async def scenario() -> None:
        core = _manager(FakeWriter())
        core.recycling["old"] = now_ms() - 61_000  # a tick forgets recycles older than a minute
        await _run_until(handlers.keepalive(core, 0.01), lambda: not core.recycling)

    asyncio.run(scenario())
