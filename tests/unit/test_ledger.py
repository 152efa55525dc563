"""Unit tests of services.dispatcher.ledger: dedup, concurrency accounting, waiting queues."""

from __future__ import annotations

from events import CodeSource, FunctionSpec, InvocationRequested
from services.dispatcher.ledger import InFlight, Ledger, Waiting


def _spec(name: str = "hello", concurrency: int = 2) -> FunctionSpec:
    return FunctionSpec(
        name=name, entrypoint="handler:main", source=CodeSource(digest="sha256:" + "0" * 64), concurrency=concurrency
    )


def _inv(i: str, fn: str = "hello", deadline_ms: int | None = None) -> InvocationRequested:
    return InvocationRequested(id=i, function=fn, deadline_ms=deadline_ms)


def _entry(i: str, node: str = "a", inc: str = "a-1", fn: str = "hello", attempt: int = 1) -> InFlight:
    return InFlight(_inv(i, fn), _spec(fn), node, inc, attempt, dispatched_ms=0)


def test_first_sight_dedups() -> None:
    ledger = Ledger()
    assert ledger.first_sight("x")
    assert not ledger.first_sight("x")
    assert not ledger.first_sight("x")
    assert ledger.first_sight("y")


def test_first_sight_capacity_is_bounded_oldest_forgotten() -> None:
    ledger = Ledger(seen_capacity=3)
    for i in "abcd":
        assert ledger.first_sight(i)
    assert len(ledger._seen) == 3
    # "a" was the oldest and fell out; the others are still remembered.
    assert not ledger.first_sight("b")
    assert not ledger.first_sight("c")
    assert not ledger.first_sight("d")
    assert ledger.first_sight("a")
    # Seeing "a" again pushed out "b".
    assert ledger.first_sight("b")


def test_concurrency_accounting() -> None:
    ledger = Ledger()
    spec = _spec(concurrency=2)
    assert ledger.running("hello") == 0
    assert ledger.has_room(spec)
    ledger.add(_entry("1"))
    assert ledger.running("hello") == 1
    assert ledger.has_room(spec)
    ledger.add(_entry("2"))
    assert ledger.running("hello") == 2
    assert not ledger.has_room(spec)
    ledger.add(_entry("3", fn="other"))
    assert ledger.running("other") == 1
    assert ledger.running("hello") == 2

    done = ledger.complete("1")
    assert done is not None and done.invocation.id == "1"
    assert ledger.running("hello") == 1
    assert ledger.has_room(spec)
    assert set(ledger.in_flight) == {"2", "3"}


def test_complete_unknown_or_twice_is_harmless() -> None:
    ledger = Ledger()
    ledger.add(_entry("1"))
    assert ledger.complete("nope") is None
    assert ledger.complete("1") is not None
    assert ledger.complete("1") is None
    assert ledger.running("hello") == 0


def test_on_node() -> None:
    ledger = Ledger()
    ledger.add(_entry("1", node="a", inc="a-1"))
    ledger.add(_entry("2", node="a", inc="a-2"))
    ledger.add(_entry("3", node="b", inc="b-1"))
    assert {e.invocation.id for e in ledger.on_node("a")} == {"1", "2"}
    assert {e.invocation.id for e in ledger.on_node("b")} == {"3"}
    assert ledger.on_node("c") == []
    # A new incarnation "a-2" took over: only what the older incarnation held is lost.
    assert [e.invocation.id for e in ledger.on_node("a", except_incarnation="a-2")] == ["1"]
    assert ledger.on_node("b", except_incarnation="b-1") == []
    # on_node only reads.
    assert len(ledger.in_flight) == 3


def test_waiting_fifo_per_function() -> None:
    ledger = Ledger()
    for i in ("1", "2", "3"):
        ledger.wait(Waiting(_inv(i), _spec(), since_ms=0))
    ledger.wait(Waiting(_inv("x", fn="other"), _spec("other"), since_ms=0))
    assert [ledger.next_waiting("hello").invocation.id for _ in range(3)] == ["1", "2", "3"]  # type: ignore[union-attr]
    assert ledger.next_waiting("hello") is None
    assert "hello" not in ledger.waiting  # empty queues are dropped
    assert ledger.next_waiting("other").invocation.id == "x"  # type: ignore[union-attr]
    assert ledger.waiting == {}
    assert ledger.next_waiting("never") is None


def test_expired_waiting_by_deadline() -> None:
    ledger = Ledger()
    ledger.wait(Waiting(_inv("d100", deadline_ms=100), _spec(), since_ms=0))
    ledger.wait(Waiting(_inv("d200", deadline_ms=200), _spec(), since_ms=0))
    ledger.wait(Waiting(_inv("free"), _spec(), since_ms=0))
    assert list(ledger.expired_waiting(now_ms=99, max_wait_ms=10_000)) == []
    assert [w.invocation.id for w in ledger.expired_waiting(now_ms=100, max_wait_ms=10_000)] == ["d100"]
    assert [w.invocation.id for w in ledger.waiting["hello"]] == ["d200", "free"]
    assert [w.invocation.id for w in ledger.expired_waiting(now_ms=250, max_wait_ms=10_000)] == ["d200"]
    assert [w.invocation.id for w in ledger.waiting["hello"]] == ["free"]


def test_expired_waiting_by_max_wait() -> None:
    ledger = Ledger()
    ledger.wait(Waiting(_inv("early"), _spec(), since_ms=1_000))
    ledger.wait(Waiting(_inv("late"), _spec(), since_ms=5_000))
    ledger.wait(Waiting(_inv("other"), _spec("other"), since_ms=1_000))
    assert list(ledger.expired_waiting(now_ms=1_999, max_wait_ms=1_000)) == []
    expired = {w.invocation.id for w in ledger.expired_waiting(now_ms=2_000, max_wait_ms=1_000)}
    assert expired == {"early", "other"}
    assert set(ledger.waiting) == {"hello"}
    assert [w.invocation.id for w in ledger.waiting["hello"]] == ["late"]
    assert [w.invocation.id for w in ledger.expired_waiting(now_ms=6_000, max_wait_ms=1_000)] == ["late"]
    assert ledger.waiting == {}


def test_deadline_takes_precedence_over_max_wait() -> None:
    # The queueing limit is for invocations without a deadline (DispatcherSettings.max_queue_s).
    ledger = Ledger()
    ledger.wait(Waiting(_inv("d", deadline_ms=50_000), _spec(), since_ms=0))
    assert list(ledger.expired_waiting(now_ms=2_000, max_wait_ms=1_000)) == []
    assert [w.invocation.id for w in ledger.expired_waiting(now_ms=50_000, max_wait_ms=1_000)] == ["d"]


def test_expired_waiting_keeps_fifo_order_of_the_rest() -> None:
    ledger = Ledger()
    ledger.wait(Waiting(_inv("1"), _spec(), since_ms=10))
    ledger.wait(Waiting(_inv("2", deadline_ms=5), _spec(), since_ms=0))
    ledger.wait(Waiting(_inv("3"), _spec(), since_ms=20))
    assert [w.invocation.id for w in ledger.expired_waiting(now_ms=6, max_wait_ms=100)] == ["2"]
    assert [ledger.next_waiting("hello").invocation.id for _ in range(2)] == ["1", "3"]  # type: ignore[union-attr]
