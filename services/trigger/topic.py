"""One topic trigger: a consumer-group member on the source topic that invokes a function per record.

Delivery is at least once. A record is *recorded* when its outcome is on the broker: the
function's output on the response topic (or nothing to write), or a ``trigger.failed`` on the
error topic after its retries. Offsets are committed per partition only up to the oldest record
not yet recorded (:class:`services.trigger.delivery.PartitionProgress`), so a copy that is
SIGKILLed loses nothing: the next owner re-reads from the committed offset. It first looks for
results of invocations sent since the commit's ``since_ms`` (on ``result``, by their
deterministic ids), so a record whose function already ran is recorded from that result instead
of being run again; only records sent and not yet finished are sent again, with the same id,
which the dispatcher collapses into the invocation it already holds.

Records run in parallel up to the trigger's ``concurrency``; with ``ordered=per-key``, one key at
a time (:class:`services.trigger.delivery.Lanes`). A failing record waits for its retries
without holding back other keys, and fetching pauses only when ``max_open`` records are open.

aiokafka directly, as the dispatcher's intake: a faststream subscriber acknowledges in reading
order and has no notion of a per-partition watermark over records handled out of order.
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
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from events import ErrorInfo, InvocationCompleted, InvocationRequested, codec, now_ms
from events.triggers import TriggerFailed, TriggerSpec, TriggerState, TriggerStatus, record_invocation_id
from services.common import telemetry
from services.common.kafkasec import client_options as kafka_client_options
from services.common.views import FETCH_MAX_WAIT_MS, FETCH_ROUTINE_TIMER_MS
from services.trigger import delivery, metrics
from services.trigger.payload import SourceRecord, decode_value, event_of, trace_carrier
from services.trigger.results import REPLY_NAME, ResultBook
from services.trigger.settings import TriggerSettings

log = logging.getLogger("stoker.trigger.topic")
tracer = trace.get_tracer("stoker.trigger")

Send = Callable[[str, bytes, bytes | None, list[tuple[str, bytes]]], Awaitable["asyncio.Future[Any]"]]
"""Queue one record (topic, value, key, headers); returns the broker's confirmation."""
ScanResults = Callable[[str, int], Awaitable[list[InvocationCompleted]]]
"""Results whose id starts with a prefix, written since an epoch ms."""
TopicExists = Callable[[str], Awaitable[bool]]

CLOCK_SLACK_MS = 10_000
"""Results are looked for this much before a commit's ``since_ms`` (clocks of hosts differ)."""
RESULT_MARGIN_S = 60.0


class TopicTrigger(ConsumerRebalanceListener):  # type: ignore[misc]
    """Runs one topic trigger until stopped (paused, deleted, changed or the service stops)."""

    def __init__(
        self,
        spec: TriggerSpec,
        settings: TriggerSettings,
        *,
        send: Send,
        book: ResultBook,
        scan_results: ScanResults,
        topic_exists: TopicExists,
    ) -> None:
        assert spec.topic is not None
        self.spec = spec
        self.topic = spec.topic
        self.settings = settings
        self._send = send
        self._book = book
        self._scan = scan_results
        self._topic_exists = topic_exists
        self.state: TriggerState = "waiting_for_topic"
        self.reason = ""
        self.delivered = 0
        self.failed = 0
        self.retried = 0
        self.lag: dict[str, int] = {}
        self.owned: set[int] = set()
        self.progress: dict[int, delivery.PartitionProgress] = {}
        self._lanes = delivery.Lanes(per_key=spec.ordered == "per-key")
        self._records: dict[tuple[int, int], SourceRecord] = {}
        self._tasks: dict[tuple[int, int], asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(spec.concurrency)
        self.max_open = max(64, spec.concurrency * 8)
        self._paused = False
        self._lock = asyncio.Lock()
        self._commit_wanted = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._generation = 0
        self.broken: BaseException | None = None

    @property
    def open(self) -> int:
        return len(self._records)

    def status(self) -> TriggerStatus:
        return TriggerStatus(
            trigger=self.spec.name,
            instance=self.settings.instance_name,
            state=self.state,
            reason=self.reason,
            lag=dict(self.lag),
            delivered=self.delivered,
            failed=self.failed,
            retried=self.retried,
            in_flight=self.open,
        )

    # ----- life ------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Wait for the topic, join the group, and consume until cancelled."""
        while not await self._topic_exists(self.topic):
            self.state, self.reason = "waiting_for_topic", f"topic {self.topic!r} does not exist"
            await asyncio.sleep(2.0)
        self.state, self.reason = "running", ""
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.common.bootstrap,
            **kafka_client_options(),
            client_id=f"stoker-{self.settings.instance_name}-{self.spec.name}",
            group_id=self.spec.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset=self.spec.start,
            isolation_level="read_committed",
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            consumer_timeout_ms=FETCH_ROUTINE_TIMER_MS,
            max_poll_records=500,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=2_000,
        )
        await self._consumer.start()
        self._consumer.subscribe([self.topic], listener=self)
        loops = [asyncio.create_task(self._fetch()), asyncio.create_task(self._commit_loop())]
        try:
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)

    async def stop(self) -> None:
        """Commit what is recorded (waiting briefly for records under way), then leave the group."""
        if self._consumer is None:
            return
        async with self._lock:
            await self._settle(set(self.owned), timeout_s=5.0)
            self._cancel(set(self.owned))
        try:
            await self._consumer.stop()
        except Exception as exc:  # noqa: BLE001 - leaving the group is best effort; the session ends anyway
            log.warning("trigger %s: consumer stop: %r", self.spec.name, exc)
        for key in list(self.metrics_partitions()):
            metrics.LAG.remove(*key)

    def metrics_partitions(self) -> list[tuple[str, str, str]]:
        return [(self.spec.name, self.topic, p) for p in self.lag]

    # ----- fetching --------------------------------------------------------------------------------

    async def _fetch(self) -> None:
        assert self._consumer is not None
        while True:
            if self.broken is not None:
                raise self.broken
            self._flow_control()
            batches = await self._consumer.getmany(timeout_ms=1_000, max_records=500)
            async with self._lock:
                for tp, records in batches.items():
                    if tp.partition not in self.owned:
                        continue  # revoked while the batch was in the consumer's buffer
                    for rec in records:
                        self._begin(
                            SourceRecord(
                                topic=rec.topic,
                                partition=rec.partition,
                                offset=rec.offset,
                                key=rec.key,
                                value=rec.value,
                                headers=list(rec.headers or ()),
                                timestamp_ms=rec.timestamp,
                            )
                        )

    def _flow_control(self) -> None:
        """Pause the source while ``max_open`` records are open (heartbeats and commits go on)."""
        assert self._consumer is not None
        parts = [TopicPartition(self.topic, p) for p in self.owned]
        if self.open >= self.max_open and not self._paused:
            self._consumer.pause(*parts)
            self._paused = True
        elif self.open < self.max_open // 2 and self._paused:
            self._consumer.resume(*self._consumer.paused())
            self._paused = False

    def _begin(self, rec: SourceRecord) -> None:
        ref = (rec.partition, rec.offset)
        if ref in self._records:
            return  # re-fetched after a seek: already open
        self.progress.setdefault(rec.partition, delivery.PartitionProgress()).begin(rec.offset, now_ms())
        self._records[ref] = rec
        metrics.IN_FLIGHT.labels(self.spec.name).set(self.open)
        lane = delivery.lane_of(rec.partition, rec.key, rec.offset, self._lanes.per_key)
        if self._lanes.add(lane, ref):
            self._start(ref)

    def _start(self, ref: tuple[int, int]) -> None:
        generation = self._generation
        task = asyncio.create_task(self._deliver(ref, generation), name=f"trigger:{self.spec.name}:{ref}")
        self._tasks[ref] = task

    async def _deliver(self, ref: tuple[int, int], generation: int) -> None:
        rec = self._records[ref]
        try:
            async with self._slots:
                await self._handle(rec)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a write the broker refused: stop, the next owner re-reads
            log.error("trigger %s: recording %s failed: %r", self.spec.name, rec.coordinates, exc)
            self.broken = exc
            return
        finally:
            self._tasks.pop(ref, None)
        if generation != self._generation or rec.partition not in self.owned:
            return
        self._records.pop(ref, None)
        metrics.IN_FLIGHT.labels(self.spec.name).set(self.open)
        self.progress[rec.partition].recorded(rec.offset)
        self._commit_wanted.set()
        lane = delivery.lane_of(rec.partition, rec.key, rec.offset, self._lanes.per_key)
        following = self._lanes.finish(lane, ref)
        if following is not None:
            self._start(following)  # type: ignore[arg-type]

    # ----- one record ------------------------------------------------------------------------------

    async def _handle(self, rec: SourceRecord) -> None:
        spec = self.spec
        carrier = trace_carrier(rec)
        context = propagate.extract(carrier) if carrier else None
        attributes: dict[str, str | int] = {
            "messaging.system": "kafka",
            "messaging.operation": "process",
            "messaging.destination.name": rec.topic,
            "messaging.kafka.destination.partition": rec.partition,
            "messaging.kafka.message.offset": rec.offset,
            "messaging.consumer.group.name": spec.consumer_group,
            "stoker.trigger": spec.name,
            telemetry.FUNCTION: spec.function,
        }
        with tracer.start_as_current_span(
            f"trigger {spec.name} process", context=context, kind=SpanKind.CONSUMER, attributes=attributes
        ) as span:
            event = event_of(rec, spec.name)
            attempt = 1
            ids: list[str] = []
            while True:
                inv = InvocationRequested(
                    id=record_invocation_id(spec.name, rec.topic, rec.partition, rec.offset, attempt),
                    function=spec.function,
                    payload=event,
                    reply_to=self.settings.common.topics.reply(REPLY_NAME),
                    deadline_ms=now_ms() + int(self.settings.invocation_deadline_s * 1000),
                )
                ids.append(inv.id)
                body = codec.encode(inv)
                if len(body) > self.settings.max_record_bytes:
                    await self._give_up(
                        rec,
                        "record_too_large",
                        ErrorInfo(
                            kind="record_too_large",
                            message=f"the invocation would be {len(body)} bytes; at most "
                            f"{self.settings.max_record_bytes} are sent to a function",
                        ),
                        attempts=0,
                        ids=[],
                    )
                    metrics.RECORDS.labels(spec.name, "too_large").inc()
                    return
                result = await self._attempt(inv, body)
                span.set_attribute(telemetry.INVOCATION_ID, inv.id)
                step = delivery.after_attempt(result.status, attempt, spec.max_retries, spec.backoff_s)
                if step.action == "done":
                    if spec.response_topic:
                        await (
                            await self._send(
                                spec.response_topic,
                                codec.encode_value(result.output),
                                rec.key,
                                self._coordinate_headers(rec, inv.id),
                            )
                        )
                    self.delivered += 1
                    metrics.RECORDS.labels(spec.name, "delivered").inc()
                    return
                if step.action == "give_up":
                    await self._give_up(rec, "function_failed", _error_of(result), attempts=attempt, ids=ids)
                    metrics.RECORDS.labels(spec.name, "failed").inc()
                    return
                self.retried += 1
                metrics.RETRIES.labels(spec.name).inc()
                await asyncio.sleep(step.delay_s)
                attempt = step.attempt

    async def _attempt(self, inv: InvocationRequested, body: bytes) -> InvocationCompleted:
        """Send one attempt (unless its result is already known) and wait for its result."""
        known = self._book.take(inv.id)
        if known is not None:
            return known
        future = self._book.expect(inv.id)
        if future.done():
            return future.result()
        headers: dict[str, str] = {}
        propagate.inject(headers)  # the record's span: the invocation's spans join the source's trace
        await (
            await self._send(
                self.settings.common.topics.invocation,
                body,
                inv.function.encode(),
                [(k, v.encode()) for k, v in headers.items()],
            )
        )
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.settings.invocation_deadline_s + RESULT_MARGIN_S)
        except TimeoutError:
            self._book.forget(inv.id)
            return InvocationCompleted(
                id=inv.id,
                function=inv.function,
                status="lost",
                error=ErrorInfo(kind="no_result", message="no result came back within the invocation's deadline"),
            )

    def _coordinate_headers(self, rec: SourceRecord, invocation: str) -> list[tuple[str, bytes]]:
        return [
            ("stoker-trigger", self.spec.name.encode()),
            ("stoker-source", rec.coordinates.encode()),
            ("stoker-invocation", invocation.encode()),
        ]

    async def _give_up(
        self, rec: SourceRecord, reason: str, error: ErrorInfo, *, attempts: int, ids: list[str]
    ) -> None:
        self.failed += 1
        log.warning(
            "trigger %s: %s gave up (%s): %s: %s", self.spec.name, rec.coordinates, reason, error.kind, error.message
        )
        if not self.spec.error_topic:
            return
        value, encoding = decode_value(rec.value)
        letter = TriggerFailed(
            trigger=self.spec.name,
            function=self.spec.function,
            source_topic=rec.topic,
            partition=rec.partition,
            offset=rec.offset,
            key=rec.key.decode("utf-8", errors="replace") if rec.key is not None else None,
            timestamp_ms=rec.timestamp_ms,
            reason=reason,
            error=error,
            attempts=attempts,
            invocations=ids,
            value=value if reason != "record_too_large" else None,  # too large to repeat whole
            value_encoding=encoding,  # type: ignore[arg-type]
        )
        await (
            await self._send(
                self.spec.error_topic,
                codec.encode(letter),
                rec.key,
                self._coordinate_headers(rec, ids[-1] if ids else ""),
            )
        )

    # ----- commits and lag -------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._commit_wanted.wait(), self.settings.status_interval_s)
            except TimeoutError:
                pass
            await asyncio.sleep(self.settings.commit_interval_s)
            self._commit_wanted.clear()
            async with self._lock:
                await self._commit()
            await self._measure_lag()

    async def _commit(self) -> None:
        assert self._consumer is not None
        at = now_ms()
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for partition in self.owned:
            progress = self.progress.get(partition)
            commit = progress.to_commit(at) if progress is not None else None
            if commit is not None:
                offsets[TopicPartition(self.topic, partition)] = OffsetAndMetadata(*commit)
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except CommitFailedError as exc:
            log.warning("trigger %s: commit refused (a rebalance is under way): %s", self.spec.name, exc)
            return
        except KafkaError as exc:
            log.warning("trigger %s: commit failed, retried with the next one: %r", self.spec.name, exc)
            self._commit_wanted.set()
            return
        for tp, om in offsets.items():
            self.progress[tp.partition].committed = om.offset

    async def _measure_lag(self) -> None:
        assert self._consumer is not None
        parts = [TopicPartition(self.topic, p) for p in sorted(self.owned)]
        if not parts:
            self.lag = {}
            return
        try:
            ends = await self._consumer.end_offsets(parts)
        except KafkaError:
            return
        lag: dict[str, int] = {}
        for tp in parts:
            progress = self.progress.get(tp.partition)
            done = progress.position if progress is not None and progress.position is not None else None
            if done is None:
                try:
                    done = await self._consumer.position(tp)
                except Exception:  # noqa: BLE001 - still being reset: nothing measured yet
                    continue
            lag[str(tp.partition)] = max(0, ends[tp] - done)
            metrics.LAG.labels(self.spec.name, self.topic, str(tp.partition)).set(lag[str(tp.partition)])
        for gone in set(self.lag) - set(lag):
            metrics.LAG.remove(self.spec.name, self.topic, gone)
        self.lag = lag

    async def _settle(self, partitions: set[int], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while any(self.progress.get(p) and self.progress[p].pending for p in partitions):
            if time.monotonic() > deadline or self.broken is not None:
                break
            await asyncio.sleep(0.05)  # records under way are recorded meanwhile (no lock needed)
        try:
            await self._commit()
        except Exception as exc:  # noqa: BLE001 - the next owner re-reads what was not committed
            log.warning("trigger %s: final commit failed: %r", self.spec.name, exc)

    def _cancel(self, partitions: set[int]) -> None:
        """Forget every open record of ``partitions`` (they are not committed: the next owner has them)."""
        self._generation += 1
        for ref in [r for r in self._records if r[0] in partitions]:
            task = self._tasks.pop(ref, None)
            if task is not None:
                task.cancel()
            self._records.pop(ref, None)
        self._lanes.drop_partitions(partitions)
        for partition in partitions:
            self.owned.discard(partition)
            self.progress.pop(partition, None)
        metrics.IN_FLIGHT.labels(self.spec.name).set(self.open)

    # ----- rebalances ------------------------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        mine = {tp.partition for tp in revoked if tp.topic == self.topic} & self.owned
        if not mine:
            return
        async with self._lock:
            await self._settle(mine, timeout_s=5.0)
            self._cancel(mine)
        log.info("trigger %s: partitions revoked: %s", self.spec.name, sorted(mine))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        assert self._consumer is not None
        new = [tp for tp in assigned if tp.topic == self.topic and tp.partition not in self.owned]
        if not new:
            return
        async with self._lock:
            await self._take_over(new)

    async def _take_over(self, tps: list[TopicPartition]) -> None:
        """Start each partition where the last owner's commit says, with the results it left behind."""
        assert self._consumer is not None
        committed = await self._consumer._coordinator.fetch_committed_offsets(set(tps))  # noqa: SLF001
        sinces: list[int] = []
        fresh: dict[TopicPartition, OffsetAndMetadata] = {}
        unstarted = [tp for tp in tps if (committed.get(tp) is None or committed[tp].offset < 0)]
        starts: dict[TopicPartition, int] = {}
        if unstarted:
            if self.spec.start == "earliest":
                starts = await self._consumer.beginning_offsets(unstarted)
            else:
                starts = await self._consumer.end_offsets(unstarted)
        for tp in tps:
            entry = committed.get(tp)
            if entry is None or entry.offset < 0:
                # A new group: fix where it starts (earliest/latest) at once, so a crash before the
                # first record is recorded does not move the start (``latest`` would skip records).
                position = starts[tp]
                self._consumer.seek(tp, position)
                fresh[tp] = OffsetAndMetadata(position, delivery.commit_metadata(now_ms()))
                self.progress[tp.partition] = delivery.PartitionProgress(position)
                continue
            since = delivery.since_of(entry.metadata)
            sinces.append(since if since is not None else 0)  # committed by someone else: look at everything
            self.progress[tp.partition] = delivery.PartitionProgress(entry.offset)
            self.progress[tp.partition].committed = entry.offset
        if fresh:
            await self._consumer.commit(fresh)
            for tp, om in fresh.items():
                self.progress[tp.partition].committed = om.offset
        if sinces:
            started = time.monotonic()
            prefix = f"trg.{self.spec.name}.{self.topic}-"
            found = await self._scan(prefix, max(0, min(sinces) - CLOCK_SLACK_MS))
            self._book.remember(found)
            log.info(
                "trigger %s: %d results of earlier attempts found in %.2f s",
                self.spec.name,
                len(found),
                time.monotonic() - started,
            )
        self.owned.update(tp.partition for tp in tps)
        log.info("trigger %s: partitions assigned: %s", self.spec.name, sorted(tp.partition for tp in tps))


def _error_of(result: InvocationCompleted) -> ErrorInfo:
    if result.error is not None:
        return result.error
    return ErrorInfo(kind=result.status, message=f"the invocation ended {result.status}")
