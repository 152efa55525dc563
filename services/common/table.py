"""A live, in-memory view of a compacted topic: the latest record per key.

Services build their view of functions and nodes from compacted topics. ``wait_caught_up``
gives read-your-writes: before answering "unknown function" a service waits until its view
has read everything that was on the topic when it asked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition

from events import codec
from events.base import Record

log = logging.getLogger("stoker.table")

R = TypeVar("R", bound=Record)


async def _stop(task: asyncio.Task[None] | None, *consumers: AIOKafkaConsumer | None) -> None:
    """Cancel a follower task and close its consumers."""
    if task is not None:
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass  # the follower's own failure was reported where it happened
    for consumer in consumers:
        if consumer is not None:
            await consumer.stop()


async def partitions_of(consumer: AIOKafkaConsumer, topic: str, timeout_s: float = 15.0) -> list[TopicPartition]:
    """Every partition of ``topic``, waiting for metadata; fails clearly if the topic is missing."""
    # Without a subscription the consumer's metadata does not cover the topic: ask for it.
    consumer._client.add_topic(topic)  # noqa: SLF001 - aiokafka has no public call for this
    deadline = time.monotonic() + timeout_s
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return [TopicPartition(topic, p) for p in sorted(parts)]
        if time.monotonic() > deadline:
            raise RuntimeError(f"topic {topic} does not exist (`stoker up` creates the platform's topics)")
        consumer._client.force_metadata_update()  # noqa: SLF001
        await asyncio.sleep(0.1)


class CompactedTable(Generic[R]):
    """Latest record per key of one compacted topic, kept current by a background task."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        expected: tuple[type[R], ...],
        *,
        on_change: Callable[[str, R | None], None] | None = None,
        on_bad_record: Callable[[str, int, int, bytes | None, bytes | None, str], None] | None = None,
    ) -> None:
        self.topic = topic
        self.rows: dict[str, R] = {}
        self._bootstrap = bootstrap
        self._expected = expected
        self._on_change = on_change
        self._on_bad_record = on_bad_record
        self._consumer: AIOKafkaConsumer | None = None
        self._probe: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._partitions: list[TopicPartition] = []
        self._progress = asyncio.Event()

    async def start(self, *, wait: bool = True) -> None:
        """Assign every partition from the beginning and start following; optionally catch up."""
        # No group: a view reads the whole topic in every process and commits nothing.
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
            isolation_level="read_committed",  # never show a record of an aborted transaction
        )
        await self._consumer.start()
        # End offsets are asked on a connection of their own: on the follower's connection the
        # request would queue behind its long-polling fetch (Kafka answers a connection in order).
        self._probe = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, enable_auto_commit=False)
        await self._probe.start()
        self._partitions = await partitions_of(self._consumer, self.topic)
        self._consumer.assign(self._partitions)
        await self._consumer.seek_to_beginning(*self._partitions)
        self._task = asyncio.create_task(self._follow(), name=f"table:{self.topic}")
        if wait:
            await self.wait_caught_up(timeout_s=30)

    async def stop(self) -> None:
        await _stop(self._task, self._consumer, self._probe)

    def get(self, key: str) -> R | None:
        return self.rows.get(key)

    async def wait_caught_up(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything on the topic now has been read; False on timeout."""
        assert self._consumer is not None and self._probe is not None
        ends = await self._probe.end_offsets(self._partitions)
        deadline = time.monotonic() + timeout_s
        while True:
            behind = [tp for tp, end in ends.items() if await self._consumer.position(tp) < end]
            if not behind:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), timeout=min(remaining, 0.2))
            except TimeoutError:
                pass

    async def _follow(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for rec in records:
                    self._apply(rec.topic, rec.partition, rec.offset, rec.key, rec.value)
            self._progress.set()

    def _apply(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            self._bad(topic, partition, offset, key, value, "record without a key on a compacted topic")
            return
        name = key.decode("utf-8", errors="replace")
        if not value:
            self.rows.pop(name, None)
            if self._on_change:
                self._on_change(name, None)
            return
        try:
            record = codec.decode(value, self._expected)
        except codec.DecodeError as exc:
            self._bad(topic, partition, offset, key, value, exc.reason)
            return
        self.rows[name] = record  # type: ignore[assignment]
        if self._on_change:
            self._on_change(name, record)  # type: ignore[arg-type]

    def _bad(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, reason: str
    ) -> None:
        log.warning("bad record %s[%s]@%s: %s", topic, partition, offset, reason)
        if self._on_bad_record:
            self._on_bad_record(topic, partition, offset, key, value, reason)


class TopicTail:
    """Follows every partition of a topic from its end (no group), calling ``on_record`` for each.

    Used where a process must see *all* new records, not a share of them (the dispatcher
    watching results, a gateway watching its reply topic). ``start`` returns only once the
    end positions are fixed, so nothing written after it returns can be missed.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        expected: tuple[type[R], ...],
        on_record: Callable[[R], object],
        *,
        on_bad_record: Callable[[str, int, int, bytes | None, bytes | None, str], None] | None = None,
        key: str | None = None,
    ) -> None:
        self.topic = topic
        self._bootstrap = bootstrap
        self._expected = expected
        self._on_record = on_record
        self._key = key.encode() if key is not None else None
        self._on_bad_record = on_bad_record
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, *, replay: bool = False, timeout_s: float = 60.0) -> None:
        """Start following. With ``replay``, first read the whole topic and return once caught up."""
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=100,
            isolation_level="read_committed",
            # aiokafka resolves a seek to the beginning with this policy, not the seek's own: they must agree.
            auto_offset_reset="earliest" if replay else "latest",
        )
        await self._consumer.start()
        tps = await partitions_of(self._consumer, self.topic)
        self._consumer.assign(tps)
        ends = await self._consumer.end_offsets(tps)
        if replay:
            await self._consumer.seek_to_beginning(*tps)
        else:
            await self._consumer.seek_to_end(*tps)
        for tp in tps:
            await self._consumer.position(tp)  # resolve the start now, not at the first fetch
        self._task = asyncio.create_task(self._follow(), name=f"tail:{self.topic}")
        deadline = time.monotonic() + timeout_s
        while replay and any([await self._consumer.position(tp) < end for tp, end in ends.items()]):
            if self._task.done():
                self._task.result()  # surface why following failed
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not read {self.topic} to its end within {timeout_s:.0f}s")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        await _stop(self._task, self._consumer)

    async def _follow(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for rec in records:
                    if self._key is not None and rec.key != self._key:
                        continue
                    try:
                        record = codec.decode(rec.value, self._expected)
                    except codec.DecodeError as exc:
                        log.warning("bad record %s[%s]@%s: %s", rec.topic, rec.partition, rec.offset, exc.reason)
                        if self._on_bad_record:
                            self._on_bad_record(rec.topic, rec.partition, rec.offset, rec.key, rec.value, exc.reason)
                        continue
                    outcome = self._on_record(record)  # type: ignore[arg-type]
                    if asyncio.iscoroutine(outcome):
                        await outcome
