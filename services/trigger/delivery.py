"""Pure decisions of a topic trigger: what may be committed, what may run, what to do after an attempt.

- :class:`PartitionProgress`: records are handled out of order (in parallel, with retries), but a
  committed offset says "every record before it has its result recorded". So the committable
  position is one past the longest prefix of *recorded* records. The commit also carries the
  earliest time any record at or after that position may have been sent to the platform
  (``since_ms``): a copy that takes the partition over looks for results from then on, so a record
  whose function already ran is not run again.
- :class:`Lanes`: with ``ordered=per-key``, records of one key run one after another (the next
  starts when the previous one is recorded); other keys, and every record with ``ordered=none``,
  do not wait for each other. A failing record holds only its own key back, and only through its
  retries: then it is recorded (on the error topic) and the key moves on.
- :func:`after_attempt`: retry with a doubling backoff, or give up to the error topic.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Literal

import orjson

COMMIT_FORMAT = 1


class PartitionProgress:
    """Offsets of one source partition in reading order, and which of them are recorded."""

    def __init__(self, position: int | None = None) -> None:
        self._open: deque[int] = deque()
        self._started: dict[int, int] = {}
        self._recorded: set[int] = set()
        self.position = position
        """One past the last offset of the recorded prefix (what a commit may say)."""
        self.committed: int | None = None

    def begin(self, offset: int, now_ms: int) -> None:
        """A record was read at ``now_ms`` (it may be sent to the platform from now on)."""
        self._open.append(offset)
        self._started[offset] = now_ms
        if self.position is None:
            self.position = offset

    def recorded(self, offset: int) -> None:
        """The record's result is recorded (response or error topic written, or nothing to write)."""
        self._recorded.add(offset)
        while self._open and self._open[0] in self._recorded:
            head = self._open.popleft()
            self._recorded.discard(head)
            self._started.pop(head, None)
            self.position = head + 1

    @property
    def pending(self) -> int:
        return len(self._open)

    def since_ms(self, now_ms: int) -> int:
        """Earliest time a record at or after :attr:`position` may have been sent: the start of
        the oldest open record, else ``now_ms`` (anything read later is sent later)."""
        return min(self._started.values(), default=now_ms)

    def to_commit(self, now_ms: int) -> tuple[int, str] | None:
        """(position, metadata) to commit now, or None when there is nothing new."""
        if self.position is None or self.position == self.committed:
            return None
        return self.position, commit_metadata(self.since_ms(now_ms))


def commit_metadata(since_ms: int) -> str:
    return orjson.dumps({"v": COMMIT_FORMAT, "since_ms": since_ms}).decode()


def since_of(metadata: str | None) -> int | None:
    """The ``since_ms`` of a commit's metadata (None for a commit not made by a trigger)."""
    if not metadata:
        return None
    try:
        value = orjson.loads(metadata)
    except orjson.JSONDecodeError:
        return None
    since = value.get("since_ms") if isinstance(value, dict) else None
    return since if isinstance(since, int) else None


class Lanes:
    """Which records may run now: per key in order (``per_key``), or all at once."""

    def __init__(self, per_key: bool) -> None:
        self.per_key = per_key
        self._queues: dict[Hashable, deque[Hashable]] = {}

    def add(self, lane: Hashable, item: Hashable) -> bool:
        """Queue ``item`` in ``lane``; True when it may start now."""
        if not self.per_key:
            return True
        queue = self._queues.setdefault(lane, deque())
        queue.append(item)
        return len(queue) == 1

    def finish(self, lane: Hashable, item: Hashable) -> Hashable | None:
        """``item`` is recorded; returns the next item of its lane that may start now, if any."""
        if not self.per_key:
            return None
        queue = self._queues.get(lane)
        if not queue:
            return None
        if queue[0] == item:
            queue.popleft()
        else:  # not the head (a dropped partition's leftovers): just forget it
            try:
                queue.remove(item)
            except ValueError:
                pass
            return None
        if not queue:
            del self._queues[lane]
            return None
        return queue[0]

    def waiting(self) -> int:
        return sum(max(0, len(q) - 1) for q in self._queues.values())

    def drop_partitions(self, partitions: set[int]) -> None:
        """Forget the lanes of partitions this copy no longer owns (lanes from :func:`lane_of`)."""
        for lane in list(self._queues):
            if isinstance(lane, tuple) and lane[0] in partitions:
                del self._queues[lane]


@dataclass(frozen=True)
class Next:
    action: Literal["done", "retry", "give_up"]
    delay_s: float = 0.0
    attempt: int = 0
    """The attempt to make next (``retry``)."""


def after_attempt(status: str, attempt: int, max_retries: int, backoff_s: float) -> Next:
    """What follows attempt number ``attempt`` (1-based) that ended with ``status``."""
    if status == "ok":
        return Next("done")
    if attempt > max_retries:
        return Next("give_up")
    return Next("retry", delay_s=backoff_s * (2 ** (attempt - 1)), attempt=attempt + 1)


def lane_of(partition: int, key: bytes | None, offset: int, per_key: bool) -> Hashable:
    """Records of one key in one partition share a lane; a record without a key is its own lane."""
    if not per_key or key is None:
        return (partition, None, offset)
    return (partition, key)
