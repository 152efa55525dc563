"""services.poolmgr.core with fake views and a fake writer: prewarms as a log, and a term taking over."""

from __future__ import annotations

import asyncio
from typing import Any

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
    Specialize,
    Topics,
)
from events.dlq import DeadLettered
from services.common.leadership import Ack, Consumed, Out
from services.poolmgr.core import PoolManager
from services.poolmgr.keepalive import FixedPolicy
from services.poolmgr.policy import ArrivalBook, PoolPolicy

TOPICS = Topics("t.")
GROUP = "stoker-poolmgr"


class FakeView:
    def __init__(self, rows: dict[str, Any] | None = None) -> None:
        self.rows: dict[str, Any] = dict(rows or {})

    def get(self, key: str) -> Any:
        return self.rows.get(key)

    async def wait_caught_up(self, timeout_s: float = 5.0) -> bool:
        return True


class FakeWriter:
    """Each call is one transaction: (records by topic, acks)."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[Out], list[Ack]]] = []

    async def __call__(self, outs: Any, acks: Any) -> None:
        if outs or acks:
            self.calls.append((list(outs), list(acks)))

    def records(self, kind: type[Record]) -> list[Any]:
        return [o.record for outs, _ in self.calls for o in outs if isinstance(o.record, kind)]


def _spec(name: str = "hello") -> FunctionSpec:
    return FunctionSpec(name=name, entrypoint="h:main", source=CodeSource(digest="sha256:" + "a" * 64))


def _node(*instances: InstanceSummary, pool_target: int = 2) -> NodeHeartbeat:
    return NodeHeartbeat(
        node="n1",
        incarnation="inc-1",
        labels={"stoker.io/role": "runtime"},
        capacity=NodeCapacity(max_instances=8),
        pool_target=pool_target,
        instances=[InstanceSummary(instance="g-1", state="generic"), *instances],
    )


def _manager(nodes: FakeView, writer: FakeWriter, timeout_s: float = 5.0) -> PoolManager:
    policy = PoolPolicy(keepalive=FixedPolicy(600.0))
    return PoolManager(
        TOPICS,
        policy,
        writer,
        functions=FakeView({"hello": _spec()}),
        nodes=nodes,
        overrides=FakeView(),
        arrivals=ArrivalBook(policy.keepalive),
        prewarm_timeout_s=timeout_s,
    )


def _at(record: Record | None, offset: int, reason: str = "") -> Consumed:
    return Consumed(
        record=record,
        reason=reason,
        group=GROUP,
        topic=TOPICS.prewarm,
        partition=0,
        offset=offset,
        key=b"hello",
        value=b"{}",
        headers=(),
    )


def test_a_request_is_started_in_one_write_and_completed_in_another() -> None:
    async def scenario() -> None:
        nodes = FakeView({"n1": _node()})
        writer = FakeWriter()
        manager = _manager(nodes, writer)
        await manager.on_prewarm(_at(PrewarmRequested(function="hello", count=1), offset=10))
        ((outs, acks),) = writer.calls
        assert [type(o.record) for o in outs] == [Specialize, PrewarmStarted]
        assert outs[0].topic == TOPICS.work("n1") and outs[1].topic == TOPICS.prewarm
        assert acks == [Ack(GROUP, TOPICS.prewarm, 0, 11)]
        started = outs[1].record
        assert isinstance(started, PrewarmStarted)
        assert (started.source_offset, started.specialize, started.wanted) == (10, {"n1": 1}, 1)

        # The started record comes back from the topic: wait for the instance, then complete.
        waiting = asyncio.create_task(manager.on_prewarm(_at(started, offset=12)))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        version = _spec().code_version
        manager.on_instance(
            InstanceChanged(
                node="n1",
                incarnation="inc-1",
                instance="i-1",
                state="ready",
                function="hello",
                function_version=version,
            )
        )
        await asyncio.wait_for(waiting, 2)
        outs, acks = writer.calls[-1]
        (done,) = [o.record for o in outs]
        assert isinstance(done, PrewarmCompleted) and (done.status, done.ready) == ("ready", 1)
        assert acks == [Ack(GROUP, TOPICS.prewarm, 0, 13)]
        assert not manager.pending

    asyncio.run(scenario())


def test_a_new_term_resumes_a_started_prewarm_without_sending_commands_again() -> None:
    async def scenario() -> None:
        first = FakeWriter()
        nodes = FakeView({"n1": _node()})
        await _manager(nodes, first).on_prewarm(_at(PrewarmRequested(function="hello", activate=True), offset=3))
        (started,) = first.records(PrewarmStarted)
        # The active copy dies here. Meanwhile the instance got loaded: the node's heartbeat shows it.
        version = _spec().code_version
        nodes.rows["n1"] = _node(
            InstanceSummary(instance="i-1", state="ready", function="hello", function_version=version)
        )
        second = FakeWriter()
        successor = _manager(nodes, second)  # a new term: nothing in memory
        await asyncio.wait_for(successor.on_prewarm(_at(started, offset=4)), 2)
        assert second.records(Specialize) == []
        (done,) = second.records(PrewarmCompleted)
        assert (done.status, done.ready, done.activated) == ("ready", 1, True)
        (activation,) = second.records(FunctionSpec)  # the version switch, in the same write as the completion
        assert activation.revision == _spec().revision + 1
        assert second.calls[-1][1] == [Ack(GROUP, TOPICS.prewarm, 0, 5)]

    asyncio.run(scenario())


def test_a_resumed_prewarm_that_never_gets_its_instances_times_out_from_its_start() -> None:
    async def scenario() -> None:
        writer = FakeWriter()
        manager = _manager(FakeView({"n1": _node()}), writer, timeout_s=0.2)
        started = PrewarmStarted(
            function="hello",
            request=PrewarmRequested(function="hello", count=2),
            target=_spec(),
            wanted=2,
            at_ms=0,  # long ago: its time is up already
        )
        await asyncio.wait_for(manager.on_prewarm(_at(started, offset=8)), 2)
        (done,) = writer.records(PrewarmCompleted)
        assert (done.status, done.ready, done.wanted) == ("timed_out", 0, 2)

    asyncio.run(scenario())


def test_own_completions_are_skipped_and_bad_records_dead_lettered_with_their_offset() -> None:
    async def scenario() -> None:
        writer = FakeWriter()
        manager = _manager(FakeView({"n1": _node()}), writer)
        await manager.on_prewarm(_at(PrewarmCompleted(function="hello", status="ready"), offset=1))
        assert writer.calls == []
        await manager.on_prewarm(_at(None, offset=2, reason="not JSON"))
        (((letter,), acks),) = writer.calls
        assert letter.topic == TOPICS.dlq and isinstance(letter.record, DeadLettered)
        assert letter.record.reason == "not JSON"
        assert acks == [Ack(GROUP, TOPICS.prewarm, 0, 3)]

    asyncio.run(scenario())


def test_keepalive_windows_are_restored_from_the_prewarm_topic() -> None:
    manager = _manager(FakeView(), FakeWriter())
    manager.restore(
        [
            PrewarmRequested(function="a", keepalive_window_ms=100),
            PrewarmRequested(function="a", keepalive_window_ms=300),
            PrewarmRequested(function="a", keepalive_window_ms=200),
            PrewarmRequested(function="b"),  # a push's prewarm, not a keep-alive one
        ]
    )
    assert manager.prewarm_requested == {"a": 300}


def test_a_term_starts_by_setting_each_live_nodes_pool_once() -> None:
    async def scenario() -> None:
        writer = FakeWriter()
        manager = _manager(FakeView({"n1": _node(pool_target=0)}), writer)
        await manager.start()
        await manager.on_heartbeat("n1", _node(pool_target=0))  # the same beat again: already told
        assert [o.record for outs, _ in writer.calls for o in outs] == [EnsurePool(incarnation="inc-1", generic=2)]

    asyncio.run(scenario())
