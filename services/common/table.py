"""Deprecated: the old view classes, kept for ``services/dispatcher`` until it moves to the Reader.

New code uses :class:`services.common.views.Reader` (``reader.table(...)``, ``reader.tail(...)``).
``CompactedTable`` and ``TopicTail`` keep their old constructors and methods, but no longer open
consumers of their own: every one started in a process (and event loop) is a view of one shared
:class:`~services.common.views.Reader`, stopped when its last view stops. As before they make no
trace spans and report bad records only to their ``on_bad_record`` hook.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from events.base import Record
from services.common.views import BadRecordHook, Reader, Table, Tail, partitions_of

__all__ = ["CompactedTable", "TopicTail", "partitions_of"]

R = TypeVar("R", bound=Record)

_shared: dict[tuple[str, int], tuple[Reader, int]] = {}
"""(bootstrap, id of the event loop) -> the shared reader and how many old-style views use it."""


def _acquire(bootstrap: str) -> tuple[Reader, tuple[str, int]]:
    key = (bootstrap, id(asyncio.get_running_loop()))
    reader, users = _shared.get(key) or (Reader(bootstrap, "views"), 0)
    _shared[key] = (reader, users + 1)
    return reader, key


async def _release(key: tuple[str, int]) -> None:
    reader, users = _shared[key]
    if users > 1:
        _shared[key] = (reader, users - 1)
        return
    del _shared[key]
    await reader.stop()


class CompactedTable(Generic[R]):
    """Latest record per key of one compacted topic (deprecated: use ``Reader.table``)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        expected: tuple[type[R], ...],
        *,
        on_change: Callable[[str, R | None], None] | None = None,
        on_bad_record: BadRecordHook | None = None,
    ) -> None:
        self.topic = topic
        self._bootstrap = bootstrap
        self._expected = expected
        self._on_change = on_change
        self._on_bad_record = on_bad_record
        self._view: Table[R] | None = None
        self._key: tuple[str, int] | None = None

    @property
    def rows(self) -> dict[str, R]:
        return self._view.rows if self._view is not None else {}

    async def start(self) -> None:
        reader, self._key = _acquire(self._bootstrap)
        self._view = reader.table(self.topic, self._expected, on_change=self._on_change, traced=False)
        self._view.on_bad_record = self._on_bad_record
        await self._view.start(timeout_s=30.0)

    async def stop(self) -> None:
        if self._view is not None and self._key is not None:
            await self._view.stop()
            await _release(self._key)
            self._key = None

    def get(self, key: str) -> R | None:
        return self.rows.get(key)

    async def wait_caught_up(self, timeout_s: float = 5.0) -> bool:
        return self._view is not None and await self._view.wait_caught_up(timeout_s)


class TopicTail:
    """Follows every partition of a topic from its end (deprecated: use ``Reader.tail``)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        expected: tuple[type[R], ...],
        on_record: Callable[[R], object],
        *,
        on_bad_record: BadRecordHook | None = None,
        key: str | None = None,
    ) -> None:
        self.topic = topic
        self._bootstrap = bootstrap
        self._expected: tuple[type[Record], ...] = expected
        self._on_record = on_record
        self._tail_key = key
        self._on_bad_record = on_bad_record
        self._view: Tail[Record] | None = None
        self._key: tuple[str, int] | None = None

    async def start(self, *, replay: bool = False, timeout_s: float = 60.0) -> None:
        reader, self._key = _acquire(self._bootstrap)
        self._view = reader.tail(
            self.topic,
            self._expected,
            self._on_record,  # type: ignore[arg-type]
            key=self._tail_key,
            replay=replay,
            traced=False,
        )
        self._view.on_bad_record = self._on_bad_record
        await self._view.start(timeout_s=timeout_s)

    async def stop(self) -> None:
        if self._view is not None and self._key is not None:
            await self._view.stop()
            await _release(self._key)
            self._key = None
