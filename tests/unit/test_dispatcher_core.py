"""Unit tests of services.dispatcher.core.Dispatcher with a recording fake publish (no broker).

The dispatcher's clock (``services.dispatcher.core.now_ms``) is replaced by a manual clock, so
heartbeat ages and queueing limits are exact and nothing sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from events import (
    CodeSource,
    Execute,
    FunctionSpec,
    InstanceSummary,
    InvocationCompleted,
    InvocationRequested,
    NodeHeartbeat,
    NodeStopped,
    PlacementOverride,
    Record,
    Taint,
    Toleration,
    codec,
    now_ms,
)
from events.work import SOURCE_HEADER
from services.common.settings import CommonSettings
from services.dispatcher import core
from services.dispatcher.core import Dispatcher
from services.dispatcher.settings import DispatcherSettings

PREFIX = "ut."
RESULT = f"{PREFIX}result"
DIGEST = "sha256:" + "cd" * 32
RUNTIME = {"stoker.io/role": "runtime"}
ISOLATED = {"stoker.io/role": "isolated"}
RUNTIME_TAINT = Taint(key="stoker.io/dedicated", value="runtime", effect="NoSchedule")
ISOLATED_TAINT = Taint(key="stoker.io/dedicated", value="isolated", effect="NoSchedule")


class Clock:
    def __init__(self, start: int) -> None:
        self.t = start

    def __call__(self) -> int:
        return self.t

    def advance(self, ms: int) -> None:
        self.t += ms


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock(now_ms())
    monkeypatch.setattr(core, "now_ms", c)
    return c


def _spec(name: str = "hello", concurrency: int = 100) -> FunctionSpec:
    return FunctionSpec(name=name, entrypoint="handler:main", source=CodeSource(digest=DIGEST), concurrency=concurrency)


class Harness:
    def __init__(self, tmp_path: Path, clock: Clock, specs: list[FunctionSpec] | None = None, **settings: Any) -> None:
        self.clock = clock
        self.sent: list[tuple[Record, str, str | None]] = []
        self.state: list[tuple[Record | None, str | None, int | None]] = []
        """Writes to the dispatch topic: (record or tombstone, invocation id, partition)."""
        self.headers: list[tuple[Record | None, dict[str, bytes]]] = []
        self.specs = {s.name: s for s in (specs if specs is not None else [_spec()])}
        self.overrides: dict[str, PlacementOverride] = {}
        self.settings = DispatcherSettings(CommonSettings(home=tmp_path, topic_prefix=PREFIX), **settings)
        self.d = Dispatcher(self.settings, self.publish, self.lookup, self.overrides.get)

    async def publish(
        self,
        record: Record | bytes | None,
        topic: str,
        key: str | None,
        partition: int | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Any:
        if isinstance(record, bytes):
            record = codec.decode(record)  # what the agent (or the next owner) will read
        if headers:
            self.headers.append((record, dict(headers)))
        if topic == f"{PREFIX}dispatch":
            self.state.append((record, key, partition))
        else:
            assert record is not None
            self.sent.append((record, topic, key))
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def lookup(self, name: str) -> FunctionSpec | None:
        return self.specs.get(name)

    # helpers

    def heartbeat(
        self,
        node: str,
        incarnation: str | None = None,
        *,
        at_ms: int | None = None,
        instances: list[InstanceSummary] | None = None,
        taints: list[Taint] | None = None,
        labels: dict[str, str] | None = None,
        unschedulable: bool = False,
    ) -> NodeHeartbeat:
        """A runtime node by default: the runtime role label and the runtime taint."""
        return NodeHeartbeat(
            node=node,
            incarnation=incarnation or f"{node}-1",
            at_ms=self.clock.t if at_ms is None else at_ms,
            instances=instances or [],
            taints=[RUNTIME_TAINT] if taints is None else taints,
            labels=RUNTIME if labels is None else labels,
            unschedulable=unschedulable,
        )

    async def isolated(self, node: str, **kw: Any) -> None:
        await self.beat(node, labels=ISOLATED, taints=[ISOLATED_TAINT], **kw)

    async def beat(self, node: str, incarnation: str | None = None, **kw: Any) -> None:
        await self.d.on_node(node, self.heartbeat(node, incarnation, **kw))

    def executes(self) -> list[tuple[Execute, str, str | None]]:
        return [(r, t, k) for r, t, k in self.sent if isinstance(r, Execute)]

    def results(self) -> list[tuple[InvocationCompleted, str, str | None]]:
        return [(r, t, k) for r, t, k in self.sent if isinstance(r, InvocationCompleted)]

    def ok(self, inv: InvocationRequested) -> InvocationCompleted:
        return InvocationCompleted(id=inv.id, function=inv.function, status="ok")


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


def warm(fn: str = "hello", version: str = DIGEST.removeprefix("sha256:")[:12]) -> InstanceSummary:
    return InstanceSummary(instance=f"warm-{fn}", state="ready", function=fn, function_version=version)


# ----- rejections before routing -------------------------------------------------------------


def test_unknown_function_is_rejected_once(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock)

    async def scenario() -> None:
        await h.beat("a")
        inv = InvocationRequested(function="nope")
        await h.d.on_invocation(inv)
        assert h.executes() == []
        assert len(h.sent) == 1
        result, topic, key = h.sent[0]
        assert isinstance(result, InvocationCompleted)
        assert (topic, key) == (RESULT, inv.id)
        assert (result.id, result.function, result.status) == (inv.id, "nope", "rejected")
        assert result.error is not None and result.error.kind == "unknown_function"
        assert "nope" in result.error.message
        # A redelivery of the same request produces nothing new.
        await h.d.on_invocation(inv)
        assert len(h.sent) == 1

    run(scenario)


def test_unknown_function_also_answers_reply_to(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock)

    async def scenario() -> None:
        inv = InvocationRequested(function="nope", reply_to=f"{PREFIX}reply.gw1")
        await h.d.on_invocation(inv)
        topics = sorted(t for _, t, _ in h.results())
        assert topics == sorted([RESULT, f"{PREFIX}reply.gw1"])
        assert all(k == inv.id and r.status == "rejected" for r, _, k in h.results())
        assert len(h.sent) == 2

    run(scenario)


def test_expired_deadline_is_a_timeout(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock)

    async def scenario() -> None:
        await h.beat("a")
        inv = InvocationRequested(function="hello", deadline_ms=clock.t - 1, reply_to="ut.reply.g")
        await h.d.on_invocation(inv)
        assert h.executes() == []
        results = h.results()
        assert sorted(t for _, t, _ in results) == sorted([RESULT, "ut.reply.g"])
        for r, _, k in results:
            assert (r.id, r.status, k) == (inv.id, "timeout", inv.id)
            assert r.error is not None and r.error.kind == "deadline_passed"
        assert h.d.ledger.in_flight == {}

    run(scenario)


def test_deadline_exactly_now_is_expired(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock)

    async def scenario() -> None:
        await h.beat("a")
        await h.d.on_invocation(InvocationRequested(function="hello", deadline_ms=clock.t))
        assert [r.status for r, _, _ in h.results()] == ["timeout"]

    run(scenario)


# ----- dispatch --------------------------------------------------------------------------------


def test_normal_invocation_goes_to_the_live_node(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock)

    async def scenario() -> None:
        await h.beat("a", "inc-a")
        inv = InvocationRequested(function="hello", payload={"x": 1}, deadline_ms=clock.t + 60_000)
        await h.d.on_invocation(inv)
        assert h.results() == []
        [(cmd, topic, key)] = h.executes()
        assert topic == f"{PREFIX}work.a"
        assert key == "hello"
        assert cmd.incarnation == "inc-a"
        assert cmd.attempt == 1
        assert cmd.invocation == inv
        assert cmd.spec == h.specs["hello"]
        entry = h.d.ledger.in_flight[inv.id]
        assert (entry.node, entry.incarnation, entry.attempt) == ("a", "inc-a", 1)
        assert h.d.nodes["a"].in_flight == {"hello": 1}
        assert h.d.ledger.running("hello") == 1

    run(scenario)


def test_result_clears_in_flight(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock)

    async def scenario() -> None:
        await h.beat("a")
        inv = InvocationRequested(function="hello")
        await h.d.on_invocation(inv)
        await h.d.on_result(h.ok(inv))
        assert h.d.ledger.in_flight == {}
        assert h.d.ledger.running("hello") == 0
        assert h.d.nodes["a"].in_flight_total == 0
        # A repeated or unknown result changes nothing and publishes nothing.
        before = list(h.sent)
        await h.d.on_result(h.ok(inv))
        await h.d.on_result(InvocationCompleted(id="unknown", function="hello", status="ok"))
        assert h.sent == before
        assert h.d.ledger.running("hello") == 0

    run(scenario)


def test_duplicate_invocation_id_dispatched_once(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock)

    async def scenario() -> None:
        await h.beat("a")
        inv = InvocationRequested(function="hello")
        await h.d.on_invocation(inv)
        await h.d.on_invocation(inv)
        await h.d.on_invocation(InvocationRequested(id=inv.id, function="hello", payload="different"))
        assert len(h.executes()) == 1
        assert h.results() == []
        # Even after it completed, the id is not run again.
        await h.d.on_result(h.ok(inv))
        await h.d.on_invocation(inv)
        assert len(h.executes()) == 1

    run(scenario)


def test_no_node_waits_then_dispatched_when_a_node_appears(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock)

    async def scenario() -> None:
        inv = InvocationRequested(function="hello")
        await h.d.on_invocation(inv)
        assert h.sent == []
        assert [w.invocation.id for w in h.d.ledger.waiting["hello"]] == [inv.id]
        await h.beat("a")
        [(cmd, topic, _)] = h.executes()
        assert (cmd.invocation.id, topic, cmd.incarnation) == (inv.id, f"{PREFIX}work.a", "a-1")
        assert h.d.ledger.waiting == {}

    run(scenario)


def test_stale_heartbeat_gets_no_work(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, node_timeout_s=3.0)

    async def scenario() -> None:
        await h.beat("old", at_ms=clock.t - 10_000)
        await h.d.on_invocation(InvocationRequested(function="hello"))
        assert h.executes() == []
        await h.beat("fresh")
        assert [t for _, t, _ in h.executes()] == [f"{PREFIX}work.fresh"]

    run(scenario)


def test_untolerated_taint_node_never_gets_work(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock)
    iso = Taint(key="stoker.io/dedicated", value="isolated", effect="NoSchedule")

    async def scenario() -> None:
        await h.beat("iso", taints=[iso], instances=[warm()])
        inv = InvocationRequested(function="hello")
        await h.d.on_invocation(inv)
        assert h.executes() == []
        await h.beat("rt", taints=[Taint(key="stoker.io/dedicated", value="runtime", effect="NoSchedule")])
        assert [t for _, t, _ in h.executes()] == [f"{PREFIX}work.rt"]

    run(scenario)


def test_warm_node_preferred(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock)

    async def scenario() -> None:
        await h.beat("a")
        await h.beat("b", instances=[warm()])
        await h.d.on_invocation(InvocationRequested(function="hello"))
        assert [t for _, t, _ in h.executes()] == [f"{PREFIX}work.b"]

    run(scenario)


# ----- concurrency -----------------------------------------------------------------------------


def test_concurrency_limit_queues_and_drains_on_result(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, specs=[_spec(concurrency=1)])

    async def scenario() -> None:
        await h.beat("a")
        first, second = InvocationRequested(function="hello"), InvocationRequested(function="hello")
        await h.d.on_invocation(first)
        await h.d.on_invocation(second)
        assert [c.invocation.id for c, _, _ in h.executes()] == [first.id]
        assert [w.invocation.id for w in h.d.ledger.waiting["hello"]] == [second.id]
        # A heartbeat or tick does not break the limit.
        await h.beat("a")
        await h.d.tick()
        assert len(h.executes()) == 1
        await h.d.on_result(h.ok(first))
        assert [c.invocation.id for c, _, _ in h.executes()] == [first.id, second.id]
        assert h.d.ledger.waiting == {}
        assert h.d.ledger.running("hello") == 1
        assert h.results() == []

    run(scenario)


def test_concurrency_is_per_function(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, specs=[_spec("one", concurrency=1), _spec("two", concurrency=1)])

    async def scenario() -> None:
        await h.beat("a")
        await h.d.on_invocation(InvocationRequested(function="one"))
        await h.d.on_invocation(InvocationRequested(function="two"))
        await h.d.on_invocation(InvocationRequested(function="one"))
        assert sorted(c.invocation.function for c, _, _ in h.executes()) == ["one", "two"]
        assert list(h.d.ledger.waiting) == ["one"]

    run(scenario)


def test_waiting_invocations_are_dispatched_in_arrival_order(tmp_path: Path, clock: Clock) -> None:
    """FIFO per function must survive ticks that find no eligible node.

    Exposes a bug: ``Dispatcher._drain`` pops the head of the queue and ``_route`` puts it back
    at the *tail* when no node is eligible, so every tick without nodes rotates the queue.
    """
    h = Harness(tmp_path, clock, specs=[_spec(concurrency=1)])

    async def scenario() -> None:
        ids = ["first", "second", "third"]
        for i in ids:
            await h.d.on_invocation(InvocationRequested(id=i, function="hello"))
        await h.d.tick()  # no node yet: nothing can be dispatched
        assert [w.invocation.id for w in h.d.ledger.waiting["hello"]] == ids
        await h.beat("a")
        assert [c.invocation.id for c, _, _ in h.executes()] == ["first"]

    run(scenario)


# ----- lost nodes ------------------------------------------------------------------------------


def test_node_stopped_retries_on_another_node(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, max_attempts=2)

    async def scenario() -> None:
        await h.beat("a")
        await h.beat("b", "b-7")
        inv = InvocationRequested(function="hello")
        await h.d.on_invocation(inv)
        assert [t for _, t, _ in h.executes()] == [f"{PREFIX}work.a"]  # tie broken by name
        await h.d.on_node("a", NodeStopped(node="a", incarnation="a-1"))
        assert "a" not in h.d.nodes
        [_, (retry, topic, _)] = h.executes()
        assert topic == f"{PREFIX}work.b"
        assert (retry.invocation.id, retry.attempt, retry.incarnation) == (inv.id, 2, "b-7")
        entry = h.d.ledger.in_flight[inv.id]
        assert (entry.node, entry.attempt) == ("b", 2)
        assert h.d.ledger.running("hello") == 1
        assert h.results() == []

    run(scenario)


def test_node_tombstone_counts_as_stopped(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock)

    async def scenario() -> None:
        await h.beat("a")
        await h.beat("b")
        await h.d.on_invocation(InvocationRequested(function="hello"))
        await h.d.on_node("a", None)
        assert "a" not in h.d.nodes
        assert [t for _, t, _ in h.executes()] == [f"{PREFIX}work.a", f"{PREFIX}work.b"]

    run(scenario)


def test_new_incarnation_retries_on_another_node(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, max_attempts=2)

    async def scenario() -> None:
        await h.beat("a", "a-1")
        await h.beat("b", "b-1")
        inv = InvocationRequested(function="hello")
        await h.d.on_invocation(inv)
        assert [t for _, t, _ in h.executes()] == [f"{PREFIX}work.a"]
        await h.beat("b", "b-1", instances=[warm()])  # b now has a warm instance
        await h.beat("a", "a-2")  # a restarted: what a-1 held is gone
        [_, (retry, topic, _)] = h.executes()
        assert topic == f"{PREFIX}work.b"
        assert (retry.invocation.id, retry.attempt, retry.incarnation) == (inv.id, 2, "b-1")
        assert h.d.nodes["a"].heartbeat.incarnation == "a-2"
        assert h.results() == []

    run(scenario)


def test_new_incarnation_retry_is_addressed_to_the_new_incarnation(tmp_path: Path, clock: Clock) -> None:
    """A retry must never be addressed to the incarnation that was just declared dead.

    Exposes a bug: ``Dispatcher.on_node`` calls ``_node_lost`` (which re-routes the lost work)
    *before* it stores the new heartbeat, so the retry is routed using the old view and the
    Execute carries the dead incarnation ``a-1``. The restarted agent skips commands for other
    incarnations, and no later heartbeat changes incarnation again: the invocation never ends.
    """
    h = Harness(tmp_path, clock, max_attempts=2)

    async def scenario() -> None:
        await h.beat("a", "a-1")
        inv = InvocationRequested(function="hello")
        await h.d.on_invocation(inv)
        await h.beat("a", "a-2")
        executes = h.executes()
        assert len(executes) == 2
        retry, topic, _ = executes[1]
        assert (retry.invocation.id, retry.attempt, topic) == (inv.id, 2, f"{PREFIX}work.a")
        assert retry.incarnation == "a-2"
        assert h.d.ledger.in_flight[inv.id].incarnation == "a-2"

    run(scenario)


def test_same_incarnation_heartbeat_changes_nothing(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock)

    async def scenario() -> None:
        await h.beat("a", "a-1")
        inv = InvocationRequested(function="hello")
        await h.d.on_invocation(inv)
        clock.advance(500)
        await h.beat("a", "a-1")
        assert len(h.executes()) == 1
        assert h.results() == []
        assert h.d.ledger.in_flight[inv.id].attempt == 1

    run(scenario)


def test_lost_after_max_attempts(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, max_attempts=2)

    async def scenario() -> None:
        await h.beat("a")
        await h.beat("b")
        inv = InvocationRequested(function="hello", reply_to=f"{PREFIX}reply.gw")
        await h.d.on_invocation(inv)
        await h.d.on_node("a", NodeStopped(node="a", incarnation="a-1"))
        assert [c.attempt for c, _, _ in h.executes()] == [1, 2]
        await h.d.on_node("b", NodeStopped(node="b", incarnation="b-1"))
        assert len(h.executes()) == 2  # no third attempt
        results = h.results()
        assert sorted(t for _, t, _ in results) == sorted([RESULT, f"{PREFIX}reply.gw"])
        for r, _, key in results:
            assert (r.id, r.status, r.attempt, r.node, key) == (inv.id, "lost", 2, "b", inv.id)
            assert r.error is not None and r.error.kind == "node_lost"
        assert h.d.ledger.in_flight == {}
        assert h.d.ledger.running("hello") == 0
        # Nothing more happens later.
        await h.beat("c")
        await h.d.tick()
        assert len(h.sent) == 4

    run(scenario)


def test_lost_immediately_with_one_attempt(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, max_attempts=1)

    async def scenario() -> None:
        await h.beat("a")
        await h.beat("b")
        inv = InvocationRequested(function="hello")
        await h.d.on_invocation(inv)
        await h.d.on_node("a", NodeStopped(node="a", incarnation="a-1"))
        assert len(h.executes()) == 1
        [(r, topic, _)] = h.results()
        assert (topic, r.id, r.status, r.attempt, r.node) == (RESULT, inv.id, "lost", 1, "a")

    run(scenario)


def test_lost_when_deadline_passed_no_retry(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, max_attempts=3)

    async def scenario() -> None:
        await h.beat("a")
        await h.beat("b")
        inv = InvocationRequested(function="hello", deadline_ms=clock.t + 1_000)
        await h.d.on_invocation(inv)
        clock.advance(2_000)
        await h.beat("b")
        await h.d.on_node("a", NodeStopped(node="a", incarnation="a-1"))
        assert len(h.executes()) == 1  # not worth retrying
        [(r, _, _)] = h.results()
        assert (r.id, r.status) == (inv.id, "lost")

    run(scenario)


def test_restart_with_max_attempts_one_is_lost(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, max_attempts=1)

    async def scenario() -> None:
        await h.beat("a", "a-1")
        inv = InvocationRequested(function="hello")
        await h.d.on_invocation(inv)
        await h.beat("a", "a-2")
        [(r, _, _)] = h.results()
        assert (r.id, r.status, r.node) == (inv.id, "lost", "a")
        assert "restarted" in r.error.message  # type: ignore[union-attr]
        assert len(h.executes()) == 1

    run(scenario)


def test_tick_declares_silent_node_lost_and_retries(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, node_timeout_s=3.0, max_attempts=2)

    async def scenario() -> None:
        await h.beat("a")
        await h.beat("b")
        inv = InvocationRequested(function="hello")
        await h.d.on_invocation(inv)
        assert [t for _, t, _ in h.executes()] == [f"{PREFIX}work.a"]
        clock.advance(2_000)
        await h.d.tick()
        assert set(h.d.nodes) == {"a", "b"}  # not silent long enough yet
        await h.beat("b")  # b keeps beating, a does not
        clock.advance(1_500)
        await h.d.tick()
        assert set(h.d.nodes) == {"b"}
        [_, (retry, topic, _)] = h.executes()
        assert (topic, retry.attempt, retry.invocation.id) == (f"{PREFIX}work.b", 2, inv.id)
        assert h.results() == []

    run(scenario)


def test_tick_silent_only_node_with_last_attempt_is_lost(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, node_timeout_s=1.0, max_attempts=1)

    async def scenario() -> None:
        await h.beat("a")
        inv = InvocationRequested(function="hello")
        await h.d.on_invocation(inv)
        clock.advance(1_001)
        await h.d.tick()
        assert h.d.nodes == {}
        [(r, _, _)] = h.results()
        assert (r.id, r.status) == (inv.id, "lost")
        await h.d.tick()
        assert len(h.results()) == 1

    run(scenario)


def test_node_returning_after_loss_gets_work_again(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, node_timeout_s=1.0)

    async def scenario() -> None:
        await h.beat("a")
        clock.advance(5_000)
        await h.d.tick()
        assert h.d.nodes == {}
        await h.d.on_invocation(InvocationRequested(function="hello"))
        assert h.executes() == []
        await h.beat("a", "a-2")
        [(cmd, topic, _)] = h.executes()
        assert (topic, cmd.incarnation) == (f"{PREFIX}work.a", "a-2")

    run(scenario)


# ----- queueing limit --------------------------------------------------------------------------


def test_waiting_past_max_queue_without_any_node_is_rejected_no_eligible_node(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, max_queue_s=2.0)

    async def scenario() -> None:
        inv = InvocationRequested(function="hello", reply_to=f"{PREFIX}reply.gw")
        await h.d.on_invocation(inv)
        clock.advance(1_999)
        await h.d.tick()
        assert h.sent == []
        clock.advance(1)
        await h.d.tick()
        results = h.results()
        assert sorted(t for _, t, _ in results) == sorted([RESULT, f"{PREFIX}reply.gw"])
        for r, _, _ in results:
            assert (r.id, r.status) == (inv.id, "rejected")
            assert r.error is not None and r.error.kind == "no_eligible_node"
            assert r.error.message == "no node may run hello: no live node"
        assert h.d.ledger.waiting == {}
        await h.d.tick()
        await h.beat("a")
        assert len(h.sent) == 2  # exactly one result per topic, and never dispatched afterwards
        assert h.executes() == []

    run(scenario)


def test_waiting_for_concurrency_past_max_queue_is_rejected(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, specs=[_spec(concurrency=1)], max_queue_s=1.0)

    async def scenario() -> None:
        await h.beat("a")
        first, second = InvocationRequested(function="hello"), InvocationRequested(function="hello")
        await h.d.on_invocation(first)
        await h.d.on_invocation(second)
        clock.advance(1_000)
        await h.beat("a")
        await h.d.tick()
        [(r, _, _)] = h.results()
        assert (r.id, r.status, r.error.kind) == (second.id, "rejected", "no_capacity")  # type: ignore[union-attr]
        assert [c.invocation.id for c, _, _ in h.executes()] == [first.id]
        await h.d.on_result(h.ok(first))
        assert len(h.executes()) == 1  # the rejected one is not dispatched later

    run(scenario)


def test_waiting_past_deadline_gets_exactly_one_result(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, max_queue_s=60.0)

    async def scenario() -> None:
        inv = InvocationRequested(function="hello", deadline_ms=clock.t + 500)
        await h.d.on_invocation(inv)
        clock.advance(499)
        await h.d.tick()
        assert h.sent == []
        clock.advance(1)
        await h.d.tick()
        await h.d.tick()
        [(r, topic, _)] = h.results()
        assert (topic, r.id) == (RESULT, inv.id)
        assert r.status in ("timeout", "rejected")

    run(scenario)


def test_no_capacity_names_the_concurrency_limit(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, specs=[_spec(concurrency=1)], max_queue_s=1.0, node_timeout_s=60.0)

    async def scenario() -> None:
        await h.beat("a")
        first, second = InvocationRequested(function="hello"), InvocationRequested(function="hello")
        await h.d.on_invocation(first)
        await h.d.on_invocation(second)
        clock.advance(1_000)
        await h.d.tick()
        [(r, _, _)] = h.results()
        assert r.id == second.id
        assert r.error is not None
        assert (r.error.kind, r.error.message) == ("no_capacity", "hello was at its concurrency of 1")

    run(scenario)


# ----- placement: selectors, taints, cordons, overrides ----------------------------------------


def test_no_eligible_node_reason_names_every_live_node(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, max_queue_s=1.0, node_timeout_s=60.0)

    async def scenario() -> None:
        await h.beat("cordoned", instances=[warm()], unschedulable=True)
        await h.isolated("iso", instances=[warm()])
        await h.beat("tainted", taints=[RUNTIME_TAINT, ISOLATED_TAINT])
        await h.beat("unlabelled", labels={})
        inv = InvocationRequested(function="hello", reply_to=f"{PREFIX}reply.gw")
        await h.d.on_invocation(inv)
        assert h.executes() == []
        clock.advance(999)
        await h.d.tick()
        assert h.sent == []
        clock.advance(1)
        await h.d.tick()
        results = h.results()
        assert sorted(t for _, t, _ in results) == sorted([RESULT, f"{PREFIX}reply.gw"])
        for r, _, key in results:
            assert (r.id, r.status, key) == (inv.id, "rejected", inv.id)
            assert r.error is not None and r.error.kind == "no_eligible_node"
            assert r.error.message == (
                "no node may run hello: cordoned: cordoned; "
                "iso: labels do not match {'stoker.io/role': 'runtime'}; "
                "tainted: untolerated taint stoker.io/dedicated=isolated:NoSchedule; "
                "unlabelled: labels do not match {'stoker.io/role': 'runtime'}"
            )
        assert h.d.ledger.waiting == {}
        await h.beat("ok")
        assert h.executes() == []  # rejected means never dispatched afterwards

    run(scenario)


def test_no_eligible_node_reason_leaves_out_stopped_and_silent_nodes(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, max_queue_s=5.0, node_timeout_s=3.0)

    async def scenario() -> None:
        await h.beat("gone")
        await h.beat("silent", unschedulable=True)
        await h.isolated("iso")
        await h.d.on_node("gone", NodeStopped(node="gone", incarnation="gone-1"))
        inv = InvocationRequested(function="hello")
        await h.d.on_invocation(inv)
        clock.advance(2_000)
        await h.isolated("iso")
        clock.advance(3_000)
        await h.d.tick()  # "iso" beat 3 s ago: still live
        [(r, _, _)] = h.results()
        assert r.error is not None and r.error.kind == "no_eligible_node"
        assert r.error.message == "no node may run hello: iso: labels do not match {'stoker.io/role': 'runtime'}"

    run(scenario)


def test_selector_mismatch_node_never_gets_work(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock)

    async def scenario() -> None:
        await h.beat("builder", labels={"stoker.io/role": "builder"}, instances=[warm()])
        await h.beat("bare", labels={}, taints=[])
        await h.d.on_invocation(InvocationRequested(function="hello"))
        assert h.executes() == []
        await h.beat("rt")
        assert [t for _, t, _ in h.executes()] == [f"{PREFIX}work.rt"]

    run(scenario)


def test_cordoned_node_gets_no_work_until_uncordoned(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock)

    async def scenario() -> None:
        await h.beat("a", instances=[warm()], unschedulable=True)
        inv = InvocationRequested(function="hello")
        await h.d.on_invocation(inv)
        assert h.executes() == []
        await h.d.tick()
        assert h.executes() == []
        await h.beat("a", instances=[warm()], unschedulable=False)  # same incarnation: uncordoned
        [(cmd, topic, _)] = h.executes()
        assert (cmd.invocation.id, topic) == (inv.id, f"{PREFIX}work.a")

    run(scenario)


def test_cordoning_a_node_moves_new_work_elsewhere(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock)

    async def scenario() -> None:
        await h.beat("a", instances=[warm()])
        await h.beat("b")
        first = InvocationRequested(function="hello")
        await h.d.on_invocation(first)
        await h.beat("a", instances=[warm()], unschedulable=True)
        second = InvocationRequested(function="hello")
        await h.d.on_invocation(second)
        assert [(c.invocation.id, t) for c, t, _ in h.executes()] == [
            (first.id, f"{PREFIX}work.a"),
            (second.id, f"{PREFIX}work.b"),
        ]
        # The invocation already on the cordoned node stays there: cordoning does not evict.
        assert h.d.ledger.in_flight[first.id].node == "a"
        assert h.results() == []

    run(scenario)


def test_isolation_override_routes_to_isolated_nodes_only(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, specs=[_spec("hello"), _spec("other")], node_timeout_s=60.0)

    async def scenario() -> None:
        await h.beat("rt", instances=[warm()])  # warm for hello: the best node without the override
        await h.isolated("iso")
        h.overrides["hello"] = PlacementOverride(function="hello", until_ms=clock.t + 10_000, by="throttler")
        await h.d.on_invocation(InvocationRequested(function="hello"))
        await h.d.on_invocation(InvocationRequested(function="other"))
        assert [(c.invocation.function, t) for c, t, _ in h.executes()] == [
            ("hello", f"{PREFIX}work.iso"),
            ("other", f"{PREFIX}work.rt"),  # the override is per function
        ]
        # Once the override has ended, hello goes back to the runtime nodes.
        clock.advance(10_000)
        await h.d.on_invocation(InvocationRequested(function="hello"))
        assert h.executes()[-1][1] == f"{PREFIX}work.rt"

    run(scenario)


def test_override_without_isolated_nodes_waits_until_one_appears(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, node_timeout_s=60.0)
    h.overrides["hello"] = PlacementOverride(function="hello")

    async def scenario() -> None:
        await h.beat("rt", instances=[warm()])
        inv = InvocationRequested(function="hello")
        await h.d.on_invocation(inv)
        await h.d.tick()
        assert h.executes() == []
        await h.isolated("iso")
        [(cmd, topic, _)] = h.executes()
        assert (cmd.invocation.id, topic, cmd.incarnation) == (inv.id, f"{PREFIX}work.iso", "iso-1")

    run(scenario)


def test_override_without_isolated_nodes_is_rejected_no_eligible_node(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, max_queue_s=1.0, node_timeout_s=60.0)
    h.overrides["hello"] = PlacementOverride(function="hello")

    async def scenario() -> None:
        await h.beat("rt")
        await h.beat("iso-no-label", labels={}, taints=[ISOLATED_TAINT])
        await h.d.on_invocation(InvocationRequested(function="hello"))
        clock.advance(1_000)
        await h.d.tick()
        [(r, _, _)] = h.results()
        assert r.error is not None and r.error.kind == "no_eligible_node"
        assert r.error.message == (
            "no node may run hello: rt: labels do not match {'stoker.io/role': 'isolated'}; "
            "iso-no-label: labels do not match {'stoker.io/role': 'isolated'}"
        )

    run(scenario)


def test_override_ending_lets_waiting_invocations_run(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, max_queue_s=30.0, node_timeout_s=60.0)

    async def scenario() -> None:
        h.overrides["hello"] = PlacementOverride(function="hello", until_ms=clock.t + 2_000)
        await h.beat("rt")
        inv = InvocationRequested(function="hello")
        await h.d.on_invocation(inv)
        clock.advance(1_999)
        await h.d.tick()
        assert h.executes() == []
        clock.advance(1)
        await h.d.tick()
        [(cmd, topic, _)] = h.executes()
        assert (cmd.invocation.id, topic) == (inv.id, f"{PREFIX}work.rt")
        assert h.results() == []

    run(scenario)


def test_retry_after_node_loss_keeps_to_the_override(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock, max_attempts=2, node_timeout_s=60.0)
    h.overrides["hello"] = PlacementOverride(function="hello")

    async def scenario() -> None:
        await h.beat("rt", instances=[warm()])
        await h.isolated("iso-a")
        await h.isolated("iso-b", incarnation="iso-b-3")
        inv = InvocationRequested(function="hello")
        await h.d.on_invocation(inv)
        assert [t for _, t, _ in h.executes()] == [f"{PREFIX}work.iso-a"]
        await h.d.on_node("iso-a", NodeStopped(node="iso-a", incarnation="iso-a-1"))
        [_, (retry, topic, _)] = h.executes()
        assert (topic, retry.attempt, retry.incarnation) == (f"{PREFIX}work.iso-b", 2, "iso-b-3")

    run(scenario)


def test_override_of_another_function_changes_nothing(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock)
    h.overrides["other"] = PlacementOverride(function="other")

    async def scenario() -> None:
        await h.beat("rt")
        await h.isolated("iso")
        await h.d.on_invocation(InvocationRequested(function="hello"))
        assert [t for _, t, _ in h.executes()] == [f"{PREFIX}work.rt"]

    run(scenario)


def test_spec_tolerations_and_selector_are_used(tmp_path: Path, clock: Clock) -> None:
    gpu_taint = Taint(key="gpu", value="true", effect="NoSchedule")
    spec = _spec().model_copy(
        update={
            "node_selector": {"stoker.io/role": "runtime", "gpu": "true"},
            "tolerations": [*_spec().tolerations, Toleration(key="gpu", operator="Exists")],
        }
    )
    h = Harness(tmp_path, clock, specs=[spec])

    async def scenario() -> None:
        await h.beat("plain", instances=[warm()])
        await h.beat("gpu", labels={"stoker.io/role": "runtime", "gpu": "true"}, taints=[RUNTIME_TAINT, gpu_taint])
        await h.d.on_invocation(InvocationRequested(function="hello"))
        assert [t for _, t, _ in h.executes()] == [f"{PREFIX}work.gpu"]

    run(scenario)


# ----- the dispatch records and recovery ------------------------------------------------------


def test_short_work_is_handed_on_by_its_result_without_a_dispatch_record(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock)

    async def scenario() -> None:
        await h.beat("a")
        inv = InvocationRequested(function="hello")
        execute, handed_on = await h.d.on_invocation(inv, partition=3, offset=40)
        assert h.state == [] and not handed_on.done()  # its offset waits: nothing says where it runs yet
        [(cmd, headers)] = h.headers
        assert isinstance(cmd, Execute) and headers[SOURCE_HEADER] == b"3:40"
        await h.d.on_result(h.ok(inv))
        assert handed_on.done() and handed_on.exception() is None
        assert h.state == []  # no record, so no tombstone either

    run(scenario)


def test_work_still_running_after_record_after_gets_its_record(tmp_path: Path, clock: Clock) -> None:
    from events.dispatch import InvocationSent

    h = Harness(tmp_path, clock, record_after_s=0.2)

    async def scenario() -> None:
        await h.beat("a")
        inv = InvocationRequested(function="hello")
        _, handed_on = await h.d.on_invocation(inv, partition=3, offset=40)
        clock.advance(150)
        await h.d.tick()
        assert h.state == [] and not handed_on.done()
        clock.advance(100)
        await h.d.tick()
        [(sent, key, part)] = h.state
        assert isinstance(sent, InvocationSent) and (key, part, sent.node, sent.source_offset) == (inv.id, 3, "a", 40)
        await asyncio.wait_for(handed_on, timeout=1)  # the record's confirmation settles the hand-off
        await h.d.on_result(h.ok(inv))
        assert h.state[-1] == (None, inv.id, 3)  # now it had a record: the result clears it

    run(scenario)


def test_queued_work_is_recorded_and_sent_with_its_record(tmp_path: Path, clock: Clock) -> None:
    from events.dispatch import InvocationQueued, InvocationSent

    h = Harness(tmp_path, clock, specs=[_spec(concurrency=1)])

    async def scenario() -> None:
        await h.beat("a")
        first, second = InvocationRequested(function="hello"), InvocationRequested(function="hello")
        await h.d.on_invocation(first, partition=3, offset=40)
        [queued_write] = await h.d.on_invocation(second, partition=3, offset=41)
        [(queued, key, part)] = h.state
        assert isinstance(queued, InvocationQueued) and (key, part, queued.source_offset) == (second.id, 3, 41)
        await h.d.on_result(h.ok(first))
        # Its offset was committed with the queued record: once sent, the record must say where.
        [_, (sent, key2, _)] = h.state
        assert isinstance(sent, InvocationSent) and key2 == second.id and sent.node == "a"

    run(scenario)


def test_unrecorded_work_is_recorded_before_its_partition_is_handed_over(tmp_path: Path, clock: Clock) -> None:
    from events.dispatch import InvocationSent

    h = Harness(tmp_path, clock)

    async def scenario() -> None:
        await h.beat("a")
        keep, give = InvocationRequested(function="hello"), InvocationRequested(function="hello")
        await h.d.on_invocation(keep, partition=1, offset=7)
        _, handed_on = await h.d.on_invocation(give, partition=2, offset=9)
        writes = await h.d.record_now([2])
        assert len(writes) == 1
        [(sent, key, part)] = h.state
        assert isinstance(sent, InvocationSent) and (key, part) == (give.id, 2)
        await asyncio.wait_for(handed_on, timeout=1)

    run(scenario)


def test_released_partition_never_hands_on_its_unrecorded_work(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock)

    async def scenario() -> None:
        await h.beat("a")
        _, handed_on = await h.d.on_invocation(InvocationRequested(function="hello"), partition=2, offset=9)
        h.d.release(2)
        assert handed_on.cancelled()  # never committed by this owner: the next one finds its Execute
        assert await h.d.record_now() == []

    run(scenario)


def test_unrecorded_work_on_a_lost_node_is_handed_on_by_its_recorded_retry(tmp_path: Path, clock: Clock) -> None:
    from events.dispatch import InvocationSent

    h = Harness(tmp_path, clock, max_attempts=2)

    async def scenario() -> None:
        await h.beat("a")
        await h.beat("b")
        inv = InvocationRequested(function="hello")
        _, handed_on = await h.d.on_invocation(inv, partition=0, offset=3)
        [(first, topic, _)] = h.executes()
        lost = topic.removeprefix(f"{PREFIX}work.")
        await h.d.on_node(lost, NodeStopped(node=lost, incarnation=f"{lost}-1"))
        [(sent, key, _)] = h.state
        assert isinstance(sent, InvocationSent) and key == inv.id and sent.attempt == 2 and sent.node != lost
        await asyncio.wait_for(handed_on, timeout=1)

    run(scenario)


def test_recover_takes_over_queued_and_in_flight_work(tmp_path: Path, clock: Clock) -> None:
    from events.dispatch import InvocationQueued, InvocationSent

    h = Harness(tmp_path, clock, specs=[_spec(concurrency=1)])

    async def scenario() -> None:
        await h.beat("a", "a-1")
        running = InvocationRequested(id="running", function="hello")
        ended = InvocationRequested(id="ended", function="hello")
        later = [InvocationRequested(id=f"q{i}", function="hello") for i in range(3)]
        states = [
            InvocationSent(invocation=running, source_offset=1, node="a", incarnation="a-1"),
            InvocationSent(invocation=ended, source_offset=0, node="a", incarnation="a-1"),
            # Out of order on purpose: arrival order is the source offset.
            InvocationQueued(invocation=later[2], source_offset=9),
            InvocationQueued(invocation=later[0], source_offset=5),
            InvocationQueued(invocation=later[1], source_offset=7),
        ]
        await h.d.recover(2, states, ended={"ended"})
        assert (None, "ended", 2) in h.state  # its result is already out: the record is cleared
        assert set(h.d.ledger.in_flight) == {"running"} and h.d.ledger.running("hello") == 1
        assert [w.invocation.id for w in h.d.ledger.waiting["hello"]] == ["q0", "q1", "q2"]
        assert h.executes() == []  # the concurrency of 1 holds across the takeover
        # A re-read of any recovered invocation is not run again.
        for inv in [running, ended, *later]:
            assert await h.d.on_invocation(inv, partition=2) == []
        await h.d.on_result(h.ok(running))
        assert [c.invocation.id for c, _, _ in h.executes()] == ["q0"]
        # Losing the partition forgets its work; the next owner has it on the dispatch topic.
        h.d.release(2)
        assert h.d.ledger.in_flight == {} and h.d.ledger.waiting == {}

    run(scenario)


def test_recovered_work_on_a_restarted_node_is_retried(tmp_path: Path, clock: Clock) -> None:
    from events.dispatch import InvocationSent

    h = Harness(tmp_path, clock, max_attempts=2)

    async def scenario() -> None:
        inv = InvocationRequested(id="r", function="hello")
        await h.d.recover(0, [InvocationSent(invocation=inv, source_offset=0, node="a", incarnation="old")], set())
        await h.beat("a", "new")  # the node came back as a new incarnation: what it ran is gone
        [(cmd, topic, _)] = h.executes()
        assert (cmd.invocation.id, cmd.incarnation, cmd.attempt, topic) == ("r", "new", 2, f"{PREFIX}work.a")

    run(scenario)


def test_a_workflow_name_is_forwarded_to_the_engine(tmp_path: Path, clock: Clock) -> None:
    h = Harness(tmp_path, clock)

    async def is_workflow(name: str) -> bool:
        return name == "flow"

    h.d = Dispatcher(h.settings, h.publish, h.lookup, h.overrides.get, is_workflow)

    async def scenario() -> None:
        inv = InvocationRequested(function="flow")
        writes = await h.d.on_invocation(inv)
        assert len(writes) == 1
        assert h.sent == [(inv, f"{PREFIX}workflow-invocation", "flow")]

    run(scenario)
