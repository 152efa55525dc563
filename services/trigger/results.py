"""Results of trigger invocations: waiters by invocation id, and results nobody waited for yet.

A result may arrive before anyone waits for it (it was found by the scan of a partition taken
over, or it belongs to an invocation sent by the copy that had the partition before), so
results without a waiter are kept, bounded, for the attempt that will look them up.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from events import InvocationCompleted

PREFIX = b"trg."
REPLY_NAME = "trigger"
"""Topic triggers' invocations ask for their results on ``<prefix>reply.trigger``, which every copy reads."""


def is_trigger_result(key: bytes | None) -> bool:
    """Results worth decoding: those of topic-trigger invocations (a cheap test on the raw key)."""
    return key is not None and key.startswith(PREFIX)


class ResultBook:
    def __init__(self, capacity: int = 50_000) -> None:
        self._waiting: dict[str, asyncio.Future[InvocationCompleted]] = {}
        self._unclaimed: OrderedDict[str, InvocationCompleted] = OrderedDict()
        self._capacity = capacity

    def take(self, invocation_id: str) -> InvocationCompleted | None:
        """A result already here for ``invocation_id`` (it is handed out once)."""
        return self._unclaimed.pop(invocation_id, None)

    def expect(self, invocation_id: str) -> asyncio.Future[InvocationCompleted]:
        future = self._waiting.get(invocation_id)
        if future is None or future.done():
            future = asyncio.get_running_loop().create_future()
            self._waiting[invocation_id] = future
        early = self._unclaimed.pop(invocation_id, None)
        if early is not None:
            future.set_result(early)
        return future

    def forget(self, invocation_id: str) -> None:
        future = self._waiting.pop(invocation_id, None)
        if future is not None and not future.done():
            future.cancel()

    def on_result(self, result: InvocationCompleted) -> None:
        future = self._waiting.pop(result.id, None)
        if future is not None and not future.done():
            future.set_result(result)
            return
        if result.id in self._unclaimed:
            return  # the first terminal result stands
        self._unclaimed[result.id] = result
        if len(self._unclaimed) > self._capacity:
            self._unclaimed.popitem(last=False)

    def remember(self, results: list[InvocationCompleted]) -> None:
        for result in results:
            self.on_result(result)
