"""Unit tests of services.gateway.results.ResultBook."""

from __future__ import annotations

import asyncio

from events import InvocationCompleted
from services.gateway.results import ResultBook


def _result(i: str, status: str = "ok", output: object = None) -> InvocationCompleted:
    return InvocationCompleted(id=i, function="hello", status=status, output=output)  # type: ignore[arg-type]


def test_expect_then_resolve() -> None:
    async def scenario() -> None:
        book = ResultBook()
        fut = book.expect("a")
        assert book.expect("a") is fut  # one future per id
        assert not fut.done()
        book.resolve(_result("a", output=42))
        assert fut.done()
        assert fut.result().output == 42
        assert book.get("a") is fut.result()
        book.resolve(_result("b"))
        assert fut.result().id == "a"
        assert book.get("b") is not None

    asyncio.run(scenario())


def test_resolve_wakes_a_waiter() -> None:
    async def scenario() -> InvocationCompleted:
        book = ResultBook()
        fut = book.expect("a")
        asyncio.get_running_loop().call_soon(book.resolve, _result("a", output="hi"))
        return await asyncio.wait_for(fut, timeout=5)

    assert asyncio.run(scenario()).output == "hi"


def test_duplicates_ignored_first_result_stands() -> None:
    async def scenario() -> None:
        book = ResultBook()
        fut = book.expect("a")
        book.resolve(_result("a", status="lost"))
        book.resolve(_result("a", status="ok", output=1))
        assert fut.result().status == "lost"
        got = book.get("a")
        assert got is not None and got.status == "lost"

    asyncio.run(scenario())


def test_duplicate_does_not_resolve_a_later_waiter_with_the_second_result() -> None:
    async def scenario() -> None:
        book = ResultBook()
        book.resolve(_result("a", status="error"))
        book.resolve(_result("a", status="ok"))
        got = book.get("a")
        assert got is not None and got.status == "error"

    asyncio.run(scenario())


def test_pending_vs_unknown() -> None:
    book = ResultBook()
    assert not book.is_pending("a")
    assert book.get("a") is None
    book.accepted("a")
    assert book.is_pending("a")
    assert book.get("a") is None
    assert not book.is_pending("b")
    book.resolve(_result("a"))
    assert not book.is_pending("a")
    assert book.get("a") is not None
    # A result for an id that was never accepted is known but not pending.
    book.resolve(_result("c"))
    assert not book.is_pending("c")
    assert book.get("c") is not None


def test_forget_drops_the_waiter() -> None:
    async def scenario() -> None:
        book = ResultBook()
        fut = book.expect("a")
        book.forget("a")
        book.forget("never")  # harmless
        book.resolve(_result("a"))
        assert not fut.done()
        assert book.get("a") is not None
        assert book.expect("b") is not book.expect("c")

    asyncio.run(scenario())


def test_resolve_after_waiter_cancelled_is_harmless() -> None:
    async def scenario() -> None:
        book = ResultBook()
        fut = book.expect("a")
        fut.cancel()
        book.resolve(_result("a"))
        assert book.get("a") is not None

    asyncio.run(scenario())


def test_done_is_bounded_oldest_evicted() -> None:
    book = ResultBook(capacity=3)
    for i in "abcde":
        book.resolve(_result(i))
    assert [i for i in "abcde" if book.get(i) is not None] == ["c", "d", "e"]
    assert len(book._done) == 3


def test_accepted_is_bounded() -> None:
    book = ResultBook(capacity=2)
    for i in "abc":
        book.accepted(i)
    assert [i for i in "abc" if book.is_pending(i)] == ["b", "c"]
    assert len(book._accepted) == 2


def test_evicted_result_is_not_reported_pending() -> None:
    """An invocation whose result was seen must never look pending again.

    Exposes a bug: ``resolve`` keeps the id in ``_accepted``; once the result falls out of the
    bounded ``_done`` cache (sync results fill it too), ``is_pending`` is True again and
    ``GET /invocations/ID`` answers 202 "pending" for an invocation that already finished.
    """
    book = ResultBook(capacity=2)
    book.accepted("async-1")
    book.resolve(_result("async-1"))
    assert not book.is_pending("async-1")
    book.resolve(_result("sync-1"))
    book.resolve(_result("sync-2"))
    assert book.get("async-1") is None  # evicted from the bounded cache, fine
    assert not book.is_pending("async-1")
