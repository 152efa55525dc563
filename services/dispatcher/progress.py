"""Pure bookkeeping of consumed offsets: how far each partition may be committed.

Records are handled concurrently and their writes confirmed out of order, but a committed
offset says "everything before this is durably handed on". So a partition's committable
position is one past the longest prefix of records whose hand-off is confirmed; one slow or
unconfirmed record holds back the commit of every record after it (they are re-read after a
crash, and the dispatcher's own state tells which of them were already handed on).
"""

from __future__ import annotations

from collections import deque


class PartitionProgress:
    """Offsets of one partition, in the order they were read, and which are handed on."""

    def __init__(self) -> None:
        self._open: deque[int] = deque()
        self._done: set[int] = set()
        self._position: int | None = None
        self._committed: int | None = None

    def begin(self, offset: int) -> None:
        """A record was read; it is not handed on yet."""
        self._open.append(offset)

    def done(self, offset: int) -> None:
        """The record's hand-off is confirmed (its writes are on the broker)."""
        self._done.add(offset)
        while self._open and self._open[0] in self._done:
            head = self._open.popleft()
            self._done.discard(head)
            self._position = head + 1

    @property
    def pending(self) -> int:
        """Records read and not yet handed on."""
        return len(self._open)

    def to_commit(self) -> int | None:
        """The position to commit now, or None when nothing new may be committed."""
        if self._position is None or self._position == self._committed:
            return None
        return self._position

    def committed(self, position: int) -> None:
        """The broker accepted a commit of ``position``."""
        if self._committed is None or position > self._committed:
            self._committed = position


class Progress:
    """:class:`PartitionProgress` of every partition this consumer owns."""

    def __init__(self) -> None:
        self.partitions: dict[int, PartitionProgress] = {}

    def of(self, partition: int) -> PartitionProgress:
        if partition not in self.partitions:
            self.partitions[partition] = PartitionProgress()
        return self.partitions[partition]

    def to_commit(self) -> dict[int, int]:
        """Partition -> position, for every partition with something new to commit."""
        out = {}
        for partition, progress in self.partitions.items():
            position = progress.to_commit()
            if position is not None:
                out[partition] = position
        return out

    def committed(self, positions: dict[int, int]) -> None:
        for partition, position in positions.items():
            if partition in self.partitions:
                self.partitions[partition].committed(position)

    def drop(self, partition: int) -> None:
        self.partitions.pop(partition, None)

    @property
    def pending(self) -> int:
        return sum(p.pending for p in self.partitions.values())
