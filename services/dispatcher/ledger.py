"""Pure bookkeeping of the dispatcher: what is in flight where, what waits, what was seen.

Its job is the delivery promise: every accepted invocation ends in exactly one terminal
result. The ledger remembers each dispatched invocation until its result is seen, so when a
node dies (missed heartbeats, or a new incarnation) the dispatcher can retry or report it lost.
Every entry belongs to the invocation partition it came from: when a rebalance takes a
partition away, its entries go (the next owner rebuilds them from the ``dispatch`` topic).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass

from events import FunctionSpec, InvocationRequested


@dataclass
class InFlight:
    invocation: InvocationRequested
    spec: FunctionSpec | None
    """None only for work recovered after its function was deleted (it is not retried)."""
    node: str
    incarnation: str
    attempt: int
    dispatched_ms: int
    partition: int = 0
    """The invocation partition it came from (its ``dispatch`` record lives on the same number)."""
    source_offset: int = 0


@dataclass
class Waiting:
    invocation: InvocationRequested
    spec: FunctionSpec
    since_ms: int
    attempt: int = 1
    partition: int = 0
    source_offset: int = 0
    recorded: bool = False
    """Its ``dispatch.queued`` record is written: it survives a crash of this dispatcher."""


class Ledger:
    """In-flight invocations by id, waiting ones per function, and recently seen ids."""

    def __init__(self, seen_capacity: int = 200_000) -> None:
        self.in_flight: dict[str, InFlight] = {}
        self.waiting: dict[str, deque[Waiting]] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._seen_capacity = seen_capacity
        self._per_function: dict[str, int] = {}

    def first_sight(self, invocation_id: str) -> bool:
        """True the first time an id is seen: a repeated request is not run twice."""
        if invocation_id in self._seen:
            return False
        self._seen[invocation_id] = None
        if len(self._seen) > self._seen_capacity:
            self._seen.popitem(last=False)
        return True

    def running(self, function: str) -> int:
        return self._per_function.get(function, 0)

    def has_room(self, spec: FunctionSpec) -> bool:
        return self.running(spec.name) < spec.concurrency

    def add(self, entry: InFlight) -> None:
        self.in_flight[entry.invocation.id] = entry
        fn = entry.invocation.function
        self._per_function[fn] = self._per_function.get(fn, 0) + 1

    def complete(self, invocation_id: str) -> InFlight | None:
        entry = self.in_flight.pop(invocation_id, None)
        if entry is not None:
            fn = entry.invocation.function
            self._per_function[fn] -= 1
        return entry

    def on_node(self, node: str, *, except_incarnation: str | None = None) -> list[InFlight]:
        """In-flight entries held by ``node`` (optionally only older incarnations)."""
        return [
            e
            for e in self.in_flight.values()
            if e.node == node and (except_incarnation is None or e.incarnation != except_incarnation)
        ]

    def wait(self, item: Waiting) -> None:
        self.waiting.setdefault(item.invocation.function, deque()).append(item)

    def wait_front(self, item: Waiting) -> None:
        """Put an item taken from the head of its queue back at the head."""
        self.waiting.setdefault(item.invocation.function, deque()).appendleft(item)

    def next_waiting(self, function: str) -> Waiting | None:
        queue = self.waiting.get(function)
        if not queue:
            return None
        item = queue.popleft()
        if not queue:
            del self.waiting[function]
        return item

    def drop_partition(self, partition: int) -> tuple[list[InFlight], list[Waiting]]:
        """Forget every entry of a partition this dispatcher no longer owns; returns them."""
        gone = [e for e in self.in_flight.values() if e.partition == partition]
        for entry in gone:
            self.complete(entry.invocation.id)
        dropped: list[Waiting] = []
        for function in list(self.waiting):
            queue = self.waiting[function]
            keep = deque(w for w in queue if w.partition != partition)
            dropped.extend(w for w in queue if w.partition == partition)
            if keep:
                self.waiting[function] = keep
            else:
                del self.waiting[function]
        return gone, dropped

    def is_empty(self) -> bool:
        return not self.in_flight and not self.waiting

    def expired_waiting(self, now_ms: int, max_wait_ms: int) -> Iterator[Waiting]:
        """Remove and yield waiting invocations whose deadline (or the queueing limit) passed."""
        for function in list(self.waiting):
            queue = self.waiting[function]
            keep: deque[Waiting] = deque()
            for item in queue:
                limit = item.invocation.deadline_ms or (item.since_ms + max_wait_ms)
                if now_ms >= limit:
                    yield item
                else:
                    keep.append(item)
            if keep:
                self.waiting[function] = keep
            else:
                del self.waiting[function]
