"""The dispatcher's intake: a consumer-group member that hands invocations on concurrently.

Dispatchers form one consumer group on ``invocation``; each owns the partitions it is assigned.
Records are fetched and handled while earlier writes are still being confirmed (the fetch loop
never waits for the broker's acknowledgements), and offsets are committed in batches, per
partition, only as far as the oldest record whose hand-off is not yet confirmed
(:mod:`services.dispatcher.progress`). On assignment, the partition's queued and in-flight
work is recovered first (:mod:`services.dispatcher.recovery`); on revocation, its pending
hand-offs are confirmed and committed before another dispatcher gets it.

This is aiokafka directly, not a faststream subscriber: a subscriber handles a record (or a
batch), acknowledges it, then fetches the next, which puts a broker round trip between batches
and has no notion of a per-partition watermark over records handled out of order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from events import InvocationRequested, codec
from services.common.kafkasec import client_options as kafka_client_options
from services.common.views import FETCH_MAX_WAIT_MS, FETCH_ROUTINE_TIMER_MS, trace_context
from services.dispatcher import recovery
from services.dispatcher.core import Dispatcher, DispatcherBroken
from services.dispatcher.progress import Progress
from services.dispatcher.settings import DispatcherSettings

log = logging.getLogger("stoker.dispatcher.intake")
tracer = trace.get_tracer("stoker.dispatcher")

GROUP = "stoker-dispatcher"

DeadLetter = Callable[[str, int, int, bytes | None, bytes | None, str], Awaitable["asyncio.Future[Any]"]]
"""Queue the dead letter of a record (topic, partition, offset, key, value, reason); returns its confirmation."""


class Intake(ConsumerRebalanceListener):  # type: ignore[misc]
    """Consumes ``invocation`` in the dispatchers' group and feeds a :class:`Dispatcher`."""

    def __init__(
        self,
        settings: DispatcherSettings,
        dispatcher: Dispatcher,
        dead_letter: DeadLetter,
        *,
        client_id: str,
    ) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.topic = settings.common.topics.invocation
        self._dead_letter = dead_letter
        self._client_id = client_id
        self.progress = Progress()
        self.owned: set[int] = set()
        self._lock = asyncio.Lock()
        self._commit_wanted = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._generation = 0
        self.ready = asyncio.Event()
        """Set once the first assignment is recovered and served."""

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.common.bootstrap,
            **kafka_client_options(),
            client_id=self._client_id,
            group_id=GROUP,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",  # workflow steps come from a transactional engine
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            consumer_timeout_ms=FETCH_ROUTINE_TIMER_MS,
            max_poll_records=1000,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=2_000,
        )
        await self._consumer.start()
        self._consumer.subscribe([self.topic], listener=self)

    async def stop(self) -> None:
        if self._consumer is None:
            return
        async with self._lock:
            await self.dispatcher.record_now()
            await self._settle(set(self.owned), timeout_s=10.0)
        await self._consumer.stop()

    # ----- the fetch loop ---------------------------------------------------------------------

    async def run(self) -> None:
        assert self._consumer is not None
        while True:
            if self.dispatcher.broken is not None:
                raise DispatcherBroken(f"a write failed: {self.dispatcher.broken!r}")
            batches = await self._consumer.getmany(timeout_ms=FETCH_MAX_WAIT_MS, max_records=1000)
            if not batches:
                continue
            async with self._lock:
                for tp, records in batches.items():
                    if tp.partition not in self.owned:
                        continue  # revoked while this batch was in the consumer's buffer
                    for rec in records:
                        await self._handle(tp.partition, rec)

    async def _handle(self, partition: int, rec: Any) -> None:
        progress = self.progress.of(partition)
        progress.begin(rec.offset)
        try:
            inv = codec.decode(rec.value, (InvocationRequested,))
        except codec.DecodeError as exc:
            letter = await self._dead_letter(rec.topic, partition, rec.offset, rec.key, rec.value, exc.reason)
            self._track(partition, rec.offset, [letter])
            return
        assert isinstance(inv, InvocationRequested)
        context = trace_context(rec.headers)
        attributes = {
            "messaging.system": "kafka",
            "messaging.operation": "process",
            "messaging.destination.name": rec.topic,
            "messaging.kafka.destination.partition": partition,
            "messaging.kafka.message.offset": rec.offset,
            "messaging.consumer.group.name": GROUP,
        }
        with tracer.start_as_current_span(
            f"{rec.topic} process", context=context, kind=SpanKind.CONSUMER, attributes=attributes
        ):
            writes = await self.dispatcher.on_invocation(inv, partition, rec.offset)
        self._track(partition, rec.offset, writes)

    def _track(self, partition: int, offset: int, writes: list[Any]) -> None:
        generation = self._generation
        writes = [w for w in writes if w is not None]
        if not writes:
            self._confirmed(partition, offset, generation)
            return
        confirmation = asyncio.gather(*writes)

        def done(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled():
                return
            exc = fut.exception()
            if exc is not None:
                if self.dispatcher.broken is None:
                    log.error("hand-off of %s[%d]@%d failed: %r", self.topic, partition, offset, exc)
                    self.dispatcher.broken = exc
                return  # never committed: the next owner re-reads it
            self._confirmed(partition, offset, generation)

        confirmation.add_done_callback(done)

    def _confirmed(self, partition: int, offset: int, generation: int) -> None:
        if generation != self._generation or partition not in self.owned:
            return
        self.progress.of(partition).done(offset)
        self._commit_wanted.set()

    # ----- commits ----------------------------------------------------------------------------

    async def commit_loop(self) -> None:
        """Commit confirmed positions, coalesced: at most every ``commit_interval_s``."""
        while True:
            await self._commit_wanted.wait()
            await asyncio.sleep(self.settings.commit_interval_s)
            self._commit_wanted.clear()
            async with self._lock:
                await self._commit()

    async def _commit(self) -> None:
        assert self._consumer is not None
        positions = {p: pos for p, pos in self.progress.to_commit().items() if p in self.owned}
        if not positions:
            return
        offsets = {TopicPartition(self.topic, p): OffsetAndMetadata(pos, "") for p, pos in positions.items()}
        try:
            await self._consumer.commit(offsets)
        except CommitFailedError as exc:
            log.warning("commit refused (a rebalance is under way): %s", exc)
            return
        except KafkaError as exc:
            log.warning("commit failed, retried with the next one: %r", exc)
            self._commit_wanted.set()
            return
        self.progress.committed(positions)

    async def _settle(self, partitions: set[int], timeout_s: float) -> None:
        """Wait (bounded) for the pending hand-offs of ``partitions``, then commit them."""
        deadline = time.monotonic() + timeout_s
        while any(self.progress.of(p).pending for p in partitions) and time.monotonic() < deadline:
            if self.dispatcher.broken is not None:
                break
            await asyncio.sleep(0.01)
        try:
            await self._commit()
        except Exception as exc:  # noqa: BLE001 - the next owner re-reads what was not committed
            log.warning("final commit failed: %r", exc)

    # ----- rebalances -------------------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        mine = {tp.partition for tp in revoked if tp.topic == self.topic}
        if not mine:
            return
        async with self._lock:
            await self.dispatcher.record_now(mine)  # the next owner reads it from dispatch, not the work tail
            await self._settle(mine, timeout_s=10.0)
            self._generation += 1
            for partition in mine:
                self.owned.discard(partition)
                self.progress.drop(partition)
                self.dispatcher.release(partition)
        log.info("partitions revoked: %s", sorted(mine))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        assert self._consumer is not None
        new = sorted(tp.partition for tp in assigned if tp.topic == self.topic and tp.partition not in self.owned)
        if new:
            async with self._lock:
                await self._recover(new)
        log.info("partitions assigned: %s (owned now %s)", new, sorted(self.owned))
        self.ready.set()

    async def _recover(self, partitions: list[int]) -> None:
        assert self._consumer is not None
        started = time.monotonic()
        topics = self.settings.common.topics
        committed = {p: await self._consumer.committed(TopicPartition(self.topic, p)) for p in partitions}
        states = await recovery.read_partitions(self.settings.common.bootstrap, topics.dispatch, self.topic, committed)
        resume = {s.partition: (committed[s.partition] or 0, s.resume_ms) for s in states if s.resume_ms is not None}
        found = await recovery.unrecorded_sends(self.settings.common.bootstrap, topics.work(""), resume)
        for state in states:
            unrecorded = recovery.merge(state.states, found.get(state.partition, []))
            await self.dispatcher.recover(state.partition, state.states.values(), ended=set(), unrecorded=unrecorded)
            self.owned.add(state.partition)
        oldest = [s.oldest_ms for s in states if s.oldest_ms is not None]
        if oldest:
            # Entries are in the ledger now: any later result reaches them through the live reader;
            # the ones written before, this search finds.
            ids, results = await recovery.ended_since(
                self.settings.common.bootstrap, topics.result, min(oldest), self.dispatcher.wants_result
            )
            for ident in ids:
                self.dispatcher.ledger.first_sight(ident)  # re-read invocations that already ended are skipped
            for result in results:
                await self.dispatcher.on_result(result)
        # What was found only in the work topics and is still running is recorded before any of
        # its re-read invocations can be committed past.
        records = await self.dispatcher.record_now(partitions)
        if records:
            await asyncio.gather(*records)
        log.info(
            "recovered partitions %s in %.2f s (%d in flight, %d of them found in the work topics, %d queued)",
            partitions,
            time.monotonic() - started,
            len(self.dispatcher.ledger.in_flight),
            len(records),
            sum(len(q) for q in self.dispatcher.ledger.waiting.values()),
        )
