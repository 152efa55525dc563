"""The agent's Kafka hot path: work commands in, in batches; results out, confirmed together.

Work commands come from a consumer of the agent's own instead of a faststream subscriber. The
subscriber took one record at a time and, with ``AckPolicy.ACK``, awaited a commit after each:
a broker round trip per command, serialized in the consume loop (and broker CPU per command),
which held a node to well under a hundred invocations a second. faststream's batch subscriber
would commit once per batch, but its tracing makes one span per batch (so an invocation's trace
would lose its work hop) and its dead-lettering would drop a whole batch for one bad record.
:class:`WorkConsumer` reads batches (``getmany``), hands each command to the agent in offset
order inside a CONSUMER span ``"<topic> process"`` whose parent is the writer's span (as
faststream's was), dead-letters what does not decode, and commits the positions of commands
already handed over in the background, at most every ``COMMIT_INTERVAL_S``.

Results go out through :class:`ResultWriter`: one task sends every result (so hundreds of
concurrent invocations do not contend for the producer's batch) and each invocation awaits the
broker's confirmation of its own records, which arrive together with the rest of their batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from pydantic import ValidationError

from events import FunctionSpec, codec
from events.base import Record
from events.dlq import DeadLettered
from services.common.broker import dead_letter_of
from services.common.kafkasec import client_options as kafka_client_options
from services.common.views import FETCH_MAX_WAIT_MS, FETCH_ROUTINE_TIMER_MS, partitions_of

__all__ = ["COMMIT_INTERVAL_S", "ResultWriter", "WorkConsumer"]

log = logging.getLogger("stoker.agent.work")
tracer = trace.get_tracer("stoker.agent")

COMMIT_INTERVAL_S = 0.5
"""Positions of handed-over commands are committed at most this often (and when the consumer stops).

A restarted agent is a new incarnation that skips its predecessor's commands anyway, so the
committed position only saves re-reading; committing per command cost a round trip each."""
MAX_BATCH = 500
"""Records taken from one fetch at most."""
YIELD_EVERY = 16
"""Commands handed over before the consume loop lets other work run."""

Handle = Callable[[Record], Awaitable[None]]
DeadLetterSink = Callable[[DeadLettered], Awaitable[object]]


class CommandDecoder:
    """``codec.decode`` for work commands, validating each distinct FunctionSpec once.

    Every Execute carries its function's whole spec, the same for every invocation of a version;
    validating it was most of the cost of decoding one. The spec's JSON is the key; a spec that
    fails on its own is left to the full decode, so the dead letter says why as it always did.
    """

    def __init__(self, expected: tuple[type[Record], ...], size: int = 256) -> None:
        self._expected = expected
        self._size = size
        self._specs: OrderedDict[bytes, FunctionSpec] = OrderedDict()

    def __call__(self, data: bytes | None) -> Record:
        if data is None:
            return codec.decode(data, self._expected)
        obj = codec.loads(data)
        spec = obj.get("spec") if isinstance(obj, dict) else None
        if isinstance(spec, dict):
            key = codec.encode_value(spec)
            known = self._specs.get(key)
            if known is None:
                try:
                    known = FunctionSpec.model_validate(spec)
                except ValidationError:
                    return codec.from_object(obj, self._expected)
                self._specs[key] = known
                if len(self._specs) > self._size:
                    self._specs.popitem(last=False)
            obj = {**obj, "spec": known}  # a model instance is taken as it is
        return codec.from_object(obj, self._expected)


def _context(rec: ConsumerRecord[bytes, bytes]) -> Any:
    """The writer's trace context from the record's headers (None without a ``traceparent``)."""
    headers = rec.headers
    if not headers or not any(k == "traceparent" for k, _ in headers):
        return None
    return propagate.extract({k: v.decode("latin-1") for k, v in headers if v is not None})


class WorkConsumer:
    """Reads a node's work topic in batches and hands each command to ``handle``, in offset order.

    ``handle`` is awaited before the next command (a Recycle or a Clamp finishes before the Execute
    behind it is handed over); an Execute handler only starts its invocation. A command's offset is
    committed only after ``handle`` returned for it. The group stores positions only: the consumer
    assigns itself every partition (one agent reads its node's topic) instead of joining the group,
    so a restart does not wait for a rebalance.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group: str,
        handle: Handle,
        dead_letters: DeadLetterSink,
        expected: tuple[type[Record], ...],
        *,
        consumer: str,
    ) -> None:
        self.topic, self.group = topic, group
        self._handle = handle
        self._dead_letters = dead_letters
        self._decode = CommandDecoder(expected)
        self._name = consumer
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            **kafka_client_options(),
            client_id=f"stoker-{consumer}",
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",  # a new node's group reads every command addressed to it
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            consumer_timeout_ms=FETCH_ROUTINE_TIMER_MS,
            max_poll_records=MAX_BATCH,
        )
        self._positions: dict[TopicPartition, int] = {}
        """The offset after the last command handed over, per partition: what a commit stores."""
        self._committed: dict[TopicPartition, int] = {}
        self._committing: asyncio.Task[None] | None = None
        self._next_commit = 0.0
        self._stopping = False
        self._fetching = False
        self._task: asyncio.Task[Any] | None = None
        self._started = False

    async def start(self) -> None:
        """Connect and take every partition of the topic from the group's committed positions."""
        await self._consumer.start()
        self._started = True
        tps = await partitions_of(self._consumer, self.topic)
        self._consumer.assign(tps)
        for tp in tps:
            await self._consumer.position(tp)  # resolve the committed position now, not on the first fetch

    async def run(self) -> None:
        """Consume until :meth:`stop`; runs as one of the service's background loops."""
        self._task = asyncio.current_task()
        while not self._stopping:
            self._fetching = True
            try:
                batches = await self._consumer.getmany(timeout_ms=FETCH_MAX_WAIT_MS, max_records=MAX_BATCH)
            except asyncio.CancelledError:
                if self._stopping:
                    return  # stop() interrupts only an idle fetch, never a half-handled batch
                raise
            finally:
                self._fetching = False
            for tp, records in batches.items():
                for n, rec in enumerate(records, 1):
                    if self._stopping:
                        break  # not handed over, not committed: the next incarnation skips it, the dispatcher re-routes
                    await self._one(rec)
                    self._positions[tp] = rec.offset + 1
                    if n % YIELD_EVERY == 0:
                        # Let the loop read instances' answers between slices of a big batch:
                        # an instance idles from its answer until the agent reads it.
                        await asyncio.sleep(0)
            self._commit_soon()

    async def _one(self, rec: ConsumerRecord[bytes, bytes]) -> None:
        attributes: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.destination.name": rec.topic,
            "messaging.kafka.destination.partition": rec.partition,
            "messaging.kafka.message.offset": rec.offset,
        }
        parent = _context(rec)
        span = tracer.start_span(f"{rec.topic} process", context=parent, kind=SpanKind.CONSUMER, attributes=attributes)
        # Current while the command is handed over: an Execute's task starts in this trace.
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            try:
                cmd = self._decode(rec.value)
            except codec.DecodeError as exc:
                span.set_status(Status(StatusCode.ERROR, exc.reason))
                await self._dead_letter(rec, exc.reason)
                return
            try:
                await self._handle(cmd)
            except Exception as exc:  # noqa: BLE001 - one failed command must not stop the node
                # As faststream's ACK policy did: logged, and the command counts as handled.
                log.exception("work command at %s[%s]@%s failed", rec.topic, rec.partition, rec.offset)
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, repr(exc)))
        finally:
            otel_context.detach(token)
            span.end()

    async def _dead_letter(self, rec: ConsumerRecord[bytes, bytes], reason: str) -> None:
        letter = dead_letter_of(rec, reason, self._name)
        log.warning("dead-lettering %s[%s]@%s: %s", rec.topic, rec.partition, rec.offset, reason)
        await self._dead_letters(letter)

    def _commit_soon(self) -> None:
        """Commit what was handed over, in the background, when the last commit is done and due."""
        if self._positions == self._committed or time.monotonic() < self._next_commit:
            return
        if self._committing is not None and not self._committing.done():
            return
        self._next_commit = time.monotonic() + COMMIT_INTERVAL_S
        self._committing = asyncio.create_task(self._commit(dict(self._positions)), name="work:commit")

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        try:
            await self._consumer.commit(offsets)  # type: ignore[arg-type]
        except KafkaError as exc:
            log.warning("committing work positions %s failed (retried with the next): %r", offsets, exc)
            return
        self._committed.update(offsets)

    async def stop(self) -> None:
        """Stop taking commands (a batch being handed over is finished), commit, disconnect."""
        self._stopping = True
        task = self._task
        if task is not None and not task.done():
            if self._fetching:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), timeout=30)
        if self._committing is not None:
            with contextlib.suppress(Exception):
                await self._committing
        if self._started:
            if self._positions != self._committed:
                await self._commit(dict(self._positions))
            with contextlib.suppress(Exception):
                await self._consumer.stop()


@dataclass
class _Outgoing:
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    span: trace.Span
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def settle(self, delivery: asyncio.Future[Any]) -> None:
        exc = KafkaError("the send was cancelled") if delivery.cancelled() else delivery.exception()
        if exc is not None:
            self.span.record_exception(exc)
            self.span.set_status(Status(StatusCode.ERROR, repr(exc)))
        self.span.end()
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)


class ResultWriter:
    """Publishes invocation results: idempotent, ``acks=all``, each awaited until the broker confirmed it.

    One task sends every record, in the order they were written: a hundred invocations ending at
    once each awaiting their own ``send`` would all wake whenever the producer's batch drained,
    and only one would fit. Each record gets a PRODUCER span ``"<topic> publish"`` in the
    invocation's trace (its ``traceparent`` travels in the headers, as faststream's publisher
    puts it there); the span ends when the broker confirmed the record.
    """

    def __init__(self, bootstrap: str, *, client_id: str) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            **kafka_client_options(),
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=0,
            request_timeout_ms=15_000,
        )
        self._queue: list[_Outgoing] = []
        self._wakeup = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._outstanding: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        await self._producer.start()
        self._sender = asyncio.create_task(self._send_loop(), name="results:send")

    async def write(self, record: Record, topics: Sequence[str], key: str) -> None:
        """Publish ``record`` to every topic of ``topics`` (key ``key``); returns once all are confirmed."""
        value = codec.encode(record)
        key_bytes = key.encode()
        pending = []
        for topic in topics:
            span = tracer.start_span(
                f"{topic} publish",
                kind=SpanKind.PRODUCER,
                attributes={"messaging.system": "kafka", "messaging.destination.name": topic},
            )
            carrier: dict[str, str] = {}
            propagate.inject(carrier, context=trace.set_span_in_context(span))
            out = _Outgoing(topic, key_bytes, value, [(k, v.encode()) for k, v in carrier.items()], span)
            self._queue.append(out)
            pending.append(out.done)
        self._wakeup.set()
        if len(pending) == 1:
            await pending[0]
        else:
            await asyncio.gather(*pending)

    async def _send_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, self._queue = self._queue, []
            for out in batch:
                try:
                    delivery = await self._producer.send(out.topic, out.value, key=out.key, headers=out.headers)
                except Exception as exc:  # noqa: BLE001 - the invocation awaiting it gets the error
                    failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                    failed.set_exception(exc)
                    out.settle(failed)
                    continue
                self._outstanding.add(out.done)
                out.done.add_done_callback(self._outstanding.discard)
                delivery.add_done_callback(out.settle)

    async def stop(self) -> None:
        """Send what is queued, wait for its confirmations (bounded), disconnect."""
        deadline = time.monotonic() + 20
        while (self._queue or self._outstanding) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        with contextlib.suppress(Exception):
            await self._producer.stop()
