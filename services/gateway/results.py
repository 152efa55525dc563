"""Results the gateway waits for or has seen: pending futures plus a bounded cache."""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from events import InvocationCompleted


class ResultBook:
    """Matches results arriving on the reply topic with the requests waiting for them."""

    def __init__(self, capacity: int = 20_000) -> None:
        self._waiting: dict[str, asyncio.Future[InvocationCompleted]] = {}
        self._accepted: OrderedDict[str, None] = OrderedDict()
        self._done: OrderedDict[str, InvocationCompleted] = OrderedDict()
        self._capacity = capacity

    def expect(self, invocation_id: str) -> asyncio.Future[InvocationCompleted]:
        future = self._waiting.get(invocation_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._waiting[invocation_id] = future
        return future

    def accepted(self, invocation_id: str) -> None:
        """Remember an async invocation so ``GET /invocations/ID`` can say it is pending."""
        self._accepted[invocation_id] = None
        while len(self._accepted) > self._capacity:
            self._accepted.popitem(last=False)

    def forget(self, invocation_id: str) -> None:
        self._waiting.pop(invocation_id, None)

    def resolve(self, result: InvocationCompleted) -> None:
        if result.id in self._done:
            return  # duplicates are dropped: the first terminal result stands
        self._done[result.id] = result
        self._accepted.pop(result.id, None)
        while len(self._done) > self._capacity:
            self._done.popitem(last=False)
        future = self._waiting.pop(result.id, None)
        if future is not None and not future.done():
            future.set_result(result)

    def get(self, invocation_id: str) -> InvocationCompleted | None:
        return self._done.get(invocation_id)

    def is_pending(self, invocation_id: str) -> bool:
        return invocation_id in self._accepted
