"""One way to read Kafka per process: a :class:`Reader` and the views it keeps current.

A service keeps *views* of topics: :class:`Table` (the latest record per key of a compacted
topic, read from the beginning, with read-your-writes through :meth:`Table.wait_caught_up`) and
:class:`Tail` (every record of a topic from its end, or from its beginning with ``replay``). All
the views of a process are served by ONE reader, which owns:

* one ``AIOKafkaConsumer`` (no group, assigned partitions, ``read_committed``, no auto-commit) that
  long-polls every partition any view needs: an idle process costs the broker one fetch per
  ``fetch_max_wait_ms`` (5 s), and a fetch returns as soon as data arrives, so latency does
  not suffer;
* one *probe* consumer for metadata and beginning/end offsets. Kafka answers a connection's
  requests in order, so a ListOffsets on the follower's connection would queue behind its
  long-poll. The probe fetches only to catch up a view attached while the follower is already
  polling (the follower's next fetch, with the new partitions, would wait at the broker behind
  the one in flight); the view then joins the follower where the probe stopped. Idle, it fetches
  nothing and costs nothing.

Usage (a service's composition root)::

    reader = Reader(common.bootstrap, "gateway", dead_letters=dead_letters_to(broker, topics.dlq))
    functions = reader.table(topics.function, (FunctionSpec,))
    replies = reader.tail(reply_topic, (InvocationCompleted,), book.resolve)
    history = reader.tail(topics.code_commit, (CodeCommitted,), remember, replay=True)
    await reader.start()   # every view so far, in one assignment: tables caught up, replays read
    ...
    late = reader.tail(topics.result, (InvocationCompleted,), on_result)
    await late.start()     # a view added later: the other views keep their positions
    await late.stop()      # only this view; the reader carries on
    await reader.stop()

A view's own ``start`` also starts the reader when it was not started (a client that opens
views as it needs them); ``reader.start()`` with no view opens nothing.

Callbacks: a table's ``on_change(key, record_or_None)`` and a tail's ``on_record(record)``. A plain
function runs inline on the reader's task (keep it short: every view of the process waits for
it); an ``async def`` runs on a task of its view's own, one record after the other, so a handler
that publishes or waits (even on this reader's ``wait_caught_up``) never stalls the reader. A
callback that raises is logged and the reader carries on.

Records that cannot be decoded, or fail their schema, go to ``dead_letters`` (built with
:func:`services.common.broker.dead_letter_of`, ``consumer`` = the service name) and are skipped.
Records with a ``traceparent`` header get a CONSUMER span ``"<topic> read"`` whose parent is the
writer's span, current while their callback runs (``traced=False`` on a view turns that off,
e.g. for heartbeats, each its own one-span trace).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from events import codec
from events.base import Record
from events.dlq import DeadLettered
from services.common.broker import dead_letter_of
from services.common.kafkasec import client_options as kafka_client_options

__all__ = [
    "FETCH_MAX_WAIT_MS",
    "FETCH_ROUTINE_TIMER_MS",
    "DeadLetterSink",
    "Reader",
    "Table",
    "Tail",
    "dead_letters_to",
    "partitions_of",
    "trace_context",
]

log = logging.getLogger("stoker.views")
tracer = trace.get_tracer("stoker.views")

R = TypeVar("R", bound=Record)

DeadLetterSink = Callable[[DeadLettered], Awaitable[object]]
"""Where a reader sends the dead letter of a record it could not use (e.g. a publish to the DLQ topic)."""
BadRecordHook = Callable[[str, int, int, bytes | None, bytes | None, str], None]
"""(topic, partition, offset, key, value, reason): what a view does with a bad record instead."""

FETCH_MAX_WAIT_MS = 5_000
"""How long the broker holds an empty fetch. A fetch returns as soon as data arrives (and a new
assignment cancels the one in flight), so this only paces an idle consumer's polls: the idle cost
is one fetch per this, per consumer."""
FETCH_ROUTINE_TIMER_MS = 1_000
"""aiokafka's ``consumer_timeout_ms``: the fetch routine's safety-net timer. It wakes on its own events
(data consumed, assignment changed); the default, 200 ms, wakes every consumer five times a second."""
_RECHECK_S = 0.1
"""While someone waits to be caught up: how often positions are looked at again."""


def dead_letters_to(broker: Any, topic: str) -> DeadLetterSink:
    """A sink publishing each dead letter to ``topic`` with faststream ``broker`` (key = the record's)."""

    async def send(letter: DeadLettered) -> None:
        await broker.publish(letter, topic, key=letter.key.encode() if letter.key else None)

    return send


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


def trace_context(headers: Sequence[tuple[str, bytes | None]] | None) -> otel_context.Context | None:
    """The writer's trace context from a record's headers, or None when it carries none."""
    if not headers or not any(k == "traceparent" for k, _ in headers):
        return None
    carrier = {k: v.decode("latin-1") for k, v in headers if v is not None}
    return propagate.extract(carrier)


def _position_of(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The consumer's position of ``tp`` without waiting (None while it is being reset)."""
    # aiokafka's position() may wait, and awaiting here could let a fetch complete before its
    # records were handed over: read the state directly.
    subscription = consumer._subscription.subscription  # noqa: SLF001
    if subscription is None or subscription.assignment is None:
        return None
    try:
        state = subscription.assignment.state_value(tp)
    except KeyError:
        return None
    if state is None or not state.has_valid_position:
        return None
    return int(state.position)


def seeks_after(
    before: AbstractSet[TopicPartition],
    wanted: AbstractSet[TopicPartition],
    kept: Mapping[TopicPartition, int | None],
    starts: Mapping[TopicPartition, int],
) -> dict[TopicPartition, int]:
    """Where to put each partition after views were attached or detached.

    ``before``/``wanted``: the partitions assigned before and after; ``kept``: the positions
    before (None: being reset); ``starts``: where newly attached views begin. A new view that
    begins below the shared position moves it back (the other views skip what they have read);
    one that begins above it leaves it (it skips what it does not need). When the assignment
    changed every partition is placed again: aiokafka's ``assign`` forgets positions.
    """
    reassigned = before != wanted
    out: dict[TopicPartition, int] = {}
    for tp in wanted:
        old = kept.get(tp) if tp in before else None
        start = starts.get(tp)
        new = start if start is not None and (old is None or start < old) else old
        if new is not None and (reassigned or new != old):
            out[tp] = new
    return out


class _View:
    """What the reader knows of every view: its topic, partitions, how far it has read, its callback."""

    def __init__(self, reader: Reader, topic: str, callback: Callable[..., object] | None, traced: bool) -> None:
        self.topic = topic
        self._reader = reader
        self._callback = callback
        self._traced = traced
        self._tps: list[TopicPartition] = []
        self._next: dict[TopicPartition, int] = {}
        """Per partition, the next offset this view needs (records below it were read or skipped)."""
        self._state = "new"  # new -> attached -> detached
        self._queue: asyncio.Queue[tuple[tuple[Any, ...], ConsumerRecord[bytes, bytes], Any]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self.on_bad_record: BadRecordHook | None = None
        """Replaces the reader's dead-lettering for this view (e.g. a replay whose bad records another
        consumer of the topic dead-letters already)."""

    @property
    def attached(self) -> bool:
        return self._state == "attached"

    async def stop(self) -> None:
        """Stop reading for this view (the reader and its other views carry on)."""
        await self._reader._detach(self)

    def _from_beginning(self) -> bool:
        raise NotImplementedError

    def _receive(self, rec: ConsumerRecord[bytes, bytes]) -> None:
        raise NotImplementedError

    # An async callback runs on a task of the view's own, in order: the reader never waits for it.

    def _begin(self) -> None:
        if self._callback is not None and inspect.iscoroutinefunction(self._callback) and self._worker is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._work(), name=f"view:{self.topic}")

    async def _end(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    async def _drained(self) -> None:
        if self._queue is not None:
            await self._queue.join()

    def _deliver(self, rec: ConsumerRecord[bytes, bytes], *args: Any) -> None:
        if self._callback is None:
            return
        ctx = trace_context(rec.headers) if self._traced else None
        if self._queue is not None:
            self._queue.put_nowait((args, rec, ctx))
        elif ctx is None:
            self._reader._call(self._callback, *args)
        else:
            with self._span(rec, ctx):
                self._reader._call(self._callback, *args)

    async def _work(self) -> None:
        assert self._queue is not None and self._callback is not None
        while True:
            args, rec, ctx = await self._queue.get()
            try:
                if ctx is None:
                    await self._callback(*args)  # type: ignore[misc]
                else:
                    with self._span(rec, ctx):
                        await self._callback(*args)  # type: ignore[misc]
            except Exception:  # noqa: BLE001 - one record's failure must not end the view
                log.exception(
                    "%s: handling %s[%s]@%s failed", self._reader.service, rec.topic, rec.partition, rec.offset
                )
            finally:
                self._queue.task_done()

    def _span(self, rec: ConsumerRecord[bytes, bytes], ctx: otel_context.Context) -> Any:
        return tracer.start_as_current_span(
            f"{rec.topic} read",
            context=ctx,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": rec.topic,
                "messaging.operation.type": "receive",
                "messaging.destination.partition.id": str(rec.partition),
                "messaging.kafka.offset": rec.offset,
                "messaging.kafka.message.key": (rec.key or b"").decode("utf-8", errors="replace"),
                "stoker.reader": self._reader.service,
            },
        )


class Table(_View, Generic[R]):
    """The latest record per key of one compacted topic, read from its beginning.

    Made by :meth:`Reader.table`. ``rows`` is the current state; a tombstone removes its key and
    calls ``on_change(key, None)``.
    """

    def __init__(
        self,
        reader: Reader,
        topic: str,
        expected: tuple[type[R], ...],
        on_change: Callable[[str, R | None], object] | None,
        traced: bool,
    ) -> None:
        super().__init__(reader, topic, on_change, traced)
        self.rows: dict[str, R] = {}
        """Key -> latest record."""
        self._expected = expected

    def get(self, key: str) -> R | None:
        return self.rows.get(key)

    async def start(self, timeout_s: float = 30.0) -> None:
        """Attach this table (starting the reader if it is not yet) and wait until it caught up."""
        await self._reader._attach([self], timeout_s)

    async def wait_caught_up(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything on the topic now has been applied to ``rows``; False on timeout.

        Read-your-writes: a record confirmed written before this call is in ``rows`` when it
        returns True (an async ``on_change`` may still be running for it).
        """
        return await self._reader._wait_caught_up([self], timeout_s)

    def _from_beginning(self) -> bool:
        return True

    def _receive(self, rec: ConsumerRecord[bytes, bytes]) -> None:
        if rec.key is None:
            self._reader._bad(self, rec, "record without a key on a compacted topic")
            return
        name = rec.key.decode("utf-8", errors="replace")
        record: R | None = None
        if rec.value:
            try:
                record = codec.decode(rec.value, self._expected)  # type: ignore[assignment]
            except codec.DecodeError as exc:
                self._reader._bad(self, rec, exc.reason)
                return
        if record is None:
            self.rows.pop(name, None)
        else:
            self.rows[name] = record
        self._deliver(rec, name, record)


class Tail(_View, Generic[R]):
    """Every new record of a topic (optionally of one key), from its end or, with ``replay``, its beginning.

    Made by :meth:`Reader.tail`. Used where a process must see *all* records, not a group's share
    (a gateway watching its reply topic, a client watching results). Tombstones are skipped.
    """

    def __init__(
        self,
        reader: Reader,
        topic: str,
        expected: tuple[type[R], ...],
        on_record: Callable[[R], object] | None,
        key: str | None,
        replay: bool,
        traced: bool,
        accept_key: Callable[[bytes | None], bool] | None = None,
    ) -> None:
        super().__init__(reader, topic, on_record, traced)
        self.replay = replay
        self._expected = expected
        self._key = key.encode() if key is not None else None
        self._accept_key = accept_key

    async def start(self, timeout_s: float = 60.0) -> None:
        """Attach this tail (starting the reader if it is not yet).

        Returns once its start positions are fixed, so nothing written after it returns is
        missed; with ``replay``, once every record up to the end has been handled.
        """
        await self._reader._attach([self], timeout_s)

    def _from_beginning(self) -> bool:
        return self.replay

    def _receive(self, rec: ConsumerRecord[bytes, bytes]) -> None:
        if self._key is not None and rec.key != self._key:
            return
        if self._accept_key is not None and not self._accept_key(rec.key):
            return  # not this process's business: not even decoded
        if not rec.value:
            return  # a tombstone: nothing happened that a tail reports
        try:
            record = codec.decode(rec.value, self._expected)
        except codec.DecodeError as exc:
            self._reader._bad(self, rec, exc.reason)
            return
        self._deliver(rec, record)


class Reader:
    """One consumer (and one probe) for every view a process keeps.

    ``service`` names the process in dead letters, spans and client ids. ``dead_letters`` gets the
    dead letter of every record a view could not use; without one they are only logged (the
    CLI's client). Views are made with :meth:`table` and :meth:`tail`; :meth:`start` attaches
    all made so far, and a view made later is attached by its own ``start``.
    """

    def __init__(
        self,
        bootstrap: str,
        service: str,
        *,
        dead_letters: DeadLetterSink | None = None,
        fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS,
        fetch_min_bytes: int = 1,
    ) -> None:
        self.bootstrap = bootstrap
        self.service = service
        self._dead_letters = dead_letters
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._fetch_min_bytes = fetch_min_bytes
        self._views: list[_View] = []
        self._by_tp: dict[TopicPartition, list[_View]] = {}
        self._delivered: dict[TopicPartition, int] = {}
        """Per assigned partition: every record below this offset was handed to its views."""
        self._consumer: AIOKafkaConsumer | None = None
        self._probe: AIOKafkaConsumer | None = None
        self._follower: asyncio.Task[None] | None = None
        self._ops: list[tuple[str, list[_View], dict[TopicPartition, int], asyncio.Future[None]]] = []
        self._wake: asyncio.Future[None] | None = None
        self._progress = asyncio.Event()
        self._start_lock = asyncio.Lock()
        self._catch_up_lock = asyncio.Lock()
        self._stopped = False
        self._background: set[asyncio.Task[Any]] = set()

    # ----- views ----------------------------------------------------------------------------------

    def table(
        self,
        topic: str,
        expected: tuple[type[R], ...],
        *,
        on_change: Callable[[str, R | None], object] | None = None,
        traced: bool = True,
    ) -> Table[R]:
        """A view of a compacted topic, attached by :meth:`start` (or its own ``start`` later)."""
        view: Table[R] = Table(self, topic, expected, on_change, traced)
        self._views.append(view)
        return view

    def tail(
        self,
        topic: str,
        expected: tuple[type[R], ...],
        on_record: Callable[[R], object] | None = None,
        *,
        key: str | None = None,
        replay: bool = False,
        traced: bool = True,
        accept_key: Callable[[bytes | None], bool] | None = None,
    ) -> Tail[R]:
        """A view following ``topic`` (only ``key``'s records, if given), from its end or with ``replay``.

        ``accept_key`` filters records by their raw key before they are decoded (a dispatcher
        reads only the results of invocations it holds).
        """
        view: Tail[R] = Tail(self, topic, expected, on_record, key, replay, traced, accept_key)
        self._views.append(view)
        return view

    # ----- life -------------------------------------------------------------------------------------

    async def start(self, timeout_s: float = 60.0) -> None:
        """Start reading: every view made so far, in one assignment.

        Returns once every table has caught up and every replaying tail has handled its topic up
        to the end (``timeout_s``; a replay that cannot finish raises, a table that cannot is
        logged), and every tail from the end has fixed its start. With no view, nothing is
        opened (the first view's own ``start`` starts the reader).
        """
        new = [v for v in self._views if v._state == "new"]
        if new:
            await self._attach(new, timeout_s)

    async def stop(self) -> None:
        """Stop every view and close both consumers."""
        self._stopped = True
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
            self._follower = None
        for view in self._views:
            await view._end()
            if view._state == "attached":
                view._state = "detached"
        for _, _, _, done in self._ops:
            if not done.done():
                done.set_exception(RuntimeError("the reader stopped"))
        self._ops.clear()
        if self._background:
            await asyncio.wait(set(self._background), timeout=5.0)
        for consumer in (self._consumer, self._probe):
            if consumer is not None:
                await consumer.stop()
        self._consumer = self._probe = None

    async def __aenter__(self) -> Reader:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    async def _ensure_started(self) -> tuple[AIOKafkaConsumer, AIOKafkaConsumer]:
        async with self._start_lock:
            if self._stopped:
                raise RuntimeError(f"the reader of {self.service} was stopped")
            if self._consumer is None or self._probe is None:
                probe = AIOKafkaConsumer(
                    bootstrap_servers=self.bootstrap,
                    **kafka_client_options(),
                    client_id=f"stoker-{self.service}-probe",
                    enable_auto_commit=False,
                    isolation_level="read_committed",  # end offsets = last stable offsets
                    # It fetches only to catch a late view up, where there is data to read: a
                    # short wait keeps its end-offset answers quick even then.
                    fetch_max_wait_ms=20,
                    # With nothing assigned its fetch routine only wakes on this timer.
                    consumer_timeout_ms=10_000,
                )
                consumer = AIOKafkaConsumer(
                    bootstrap_servers=self.bootstrap,
                    **kafka_client_options(),
                    client_id=f"stoker-{self.service}-reader",
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",  # only used after an out-of-range position
                    isolation_level="read_committed",  # never show a record of an aborted transaction
                    fetch_max_wait_ms=self._fetch_max_wait_ms,
                    fetch_min_bytes=self._fetch_min_bytes,
                    # The fetch routine wakes on its own events (data consumed, assignment changed);
                    # its safety-net timer need not tick five times a second.
                    consumer_timeout_ms=FETCH_ROUTINE_TIMER_MS,
                )
                await probe.start()
                try:
                    await consumer.start()
                except BaseException:
                    await probe.stop()
                    raise
                self._probe, self._consumer = probe, consumer
                self._wake = asyncio.get_running_loop().create_future()
                self._follower = asyncio.create_task(self._follow(), name=f"reader:{self.service}")
            return self._consumer, self._probe

    # ----- attaching and detaching -----------------------------------------------------------------

    async def _attach(self, views: list[_View], timeout_s: float) -> None:
        _, probe = await self._ensure_started()
        views = [v for v in views if v._state == "new"]
        if not views:
            return
        for view in views:
            if view not in self._views:
                self._views.append(view)
        parts = await asyncio.gather(*(partitions_of(probe, t) for t in {v.topic for v in views}))
        by_topic = {tps[0].topic: tps for tps in parts}
        early = [tp for v in views if v._from_beginning() for tp in by_topic[v.topic]]
        late = [tp for v in views if not v._from_beginning() for tp in by_topic[v.topic]]
        beginnings = await probe.beginning_offsets(list(set(early))) if early else {}
        ends = await probe.end_offsets(list(set(late))) if late else {}
        for view in views:
            view._tps = by_topic[view.topic]
            offsets = beginnings if view._from_beginning() else ends
            view._next = {tp: offsets[tp] for tp in view._tps}
            view._begin()
        waiting = [v for v in views if v._from_beginning()]
        # A follower already long-polling sends its next fetch (with the new partitions) only to
        # wait at the broker behind the one in flight: the backlog is read on the probe instead.
        on_probe = bool(waiting and self._by_tp)
        caught_up = await self._catch_up(waiting, timeout_s) if on_probe else False
        starts: dict[TopicPartition, int] = {}
        for view in views:
            for tp in view._tps:
                starts[tp] = min(starts.get(tp, view._next[tp]), view._next[tp])
        await self._submit("attach", views, starts)
        if not waiting:
            return
        if not caught_up:
            caught_up = await self._wait_caught_up(waiting, timeout_s)
        if not caught_up:
            replays = [v.topic for v in waiting if isinstance(v, Tail)]
            if replays:
                raise RuntimeError(f"could not read {', '.join(replays)} to the end within {timeout_s:.0f}s")
            log.warning(
                "%s: views of %s not caught up after %.0fs", self.service, [v.topic for v in waiting], timeout_s
            )
        for view in waiting:
            if isinstance(view, Tail):
                await view._drained()  # a replay has been handled, not just read

    async def _catch_up(self, views: list[_View], timeout_s: float) -> bool:
        """Hand ``views`` every record up to the topics' current ends, read on the probe.

        The views are not attached yet, so the follower hands them nothing meanwhile; afterwards
        they are attached where the probe stopped. False if the ends were not reached in time.
        """
        probe = self._probe
        assert probe is not None
        async with self._catch_up_lock:
            tps = sorted({tp for v in views for tp in v._tps})
            users = {tp: [v for v in views if tp in v._next] for tp in tps}
            ends = await probe.end_offsets(tps)
            if not any(v._next[tp] < ends[tp] for tp in tps for v in users[tp]):
                return True  # nothing to read
            probe.assign(tps)
            try:
                for tp in tps:
                    probe.seek(tp, min(v._next[tp] for v in users[tp]))
                deadline = time.monotonic() + timeout_s
                while any(v._next[tp] < ends[tp] for tp in tps for v in users[tp]):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    batches = await probe.getmany(timeout_ms=int(min(remaining, 1.0) * 1000))
                    self._hand_to(users, batches)
                    for tp in tps:  # positions also move past transaction markers, with no record
                        position = _position_of(probe, tp)
                        for view in users[tp]:
                            if position is not None and position > view._next[tp]:
                                view._next[tp] = position
                return True
            finally:
                # Back to fetching nothing. An empty assignment rather than unsubscribe(): aiokafka's
                # fetch routine fails if the subscription is gone before it saw the last one.
                probe.assign([])

    async def _detach(self, view: _View) -> None:
        await view._end()
        if view._state == "attached" and not self._stopped and self._follower is not None:
            await self._submit("detach", [view], {})
        view._state = "detached"
        if view in self._views:
            self._views.remove(view)

    async def _submit(self, kind: str, views: list[_View], starts: dict[TopicPartition, int]) -> None:
        done = asyncio.get_running_loop().create_future()
        self._ops.append((kind, views, starts, done))
        self._poke()
        await done

    def _poke(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _apply_ops(self) -> None:
        """Attach and detach views; runs on the follower's task, between fetches, so no record is
        handed to a view out of order."""
        consumer = self._consumer
        assert consumer is not None
        ops, self._ops = self._ops, []
        before = set(self._by_tp)
        kept = {tp: self._position_now(tp) for tp in before}
        rewind: dict[TopicPartition, int] = {}
        for kind, views, starts, _ in ops:
            for view in views:
                for tp in view._tps:
                    users = self._by_tp.setdefault(tp, [])
                    if kind == "attach":
                        users.append(view)
                    elif view in users:
                        users.remove(view)
                    if not users:
                        del self._by_tp[tp]
                if kind == "attach":
                    view._state = "attached"
                else:
                    view._state = "detached"
            for tp, offset in starts.items():
                rewind[tp] = min(rewind.get(tp, offset), offset)
        wanted = set(self._by_tp)
        if wanted != before:
            if wanted:
                # assign() replaces the assignment and forgets every position: put the kept ones back.
                consumer.assign(sorted(wanted))
            else:
                consumer.unsubscribe()
        for tp, position in seeks_after(before, wanted, kept, rewind).items():
            consumer.seek(tp, position)
            self._delivered[tp] = position
        for tp in before - wanted:
            self._delivered.pop(tp, None)
        for _, _, _, done in ops:
            if not done.done():
                done.set_result(None)

    def _position_now(self, tp: TopicPartition) -> int | None:
        assert self._consumer is not None
        return _position_of(self._consumer, tp)

    # ----- following -------------------------------------------------------------------------------

    async def _follow(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        loop = asyncio.get_running_loop()
        fetch: asyncio.Task[dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]] | None = None
        try:
            while True:
                if self._ops:
                    if fetch is not None:
                        fetch.cancel()
                        self._hand_over(await self._result_of(fetch))
                        fetch = None
                    self._apply_ops()
                    self._note_positions()
                if self._wake is None or self._wake.done():
                    self._wake = loop.create_future()
                if not self._by_tp:
                    await self._wake
                    continue
                if fetch is None:
                    # No timeout of our own: the broker's long poll paces the loop, and a change
                    # of views pokes it.
                    fetch = asyncio.ensure_future(consumer.getmany(timeout_ms=3_600_000))
                await asyncio.wait({fetch, self._wake}, return_when=asyncio.FIRST_COMPLETED)
                if fetch.done():
                    batches = await self._result_of(fetch)
                    fetch = None
                    self._hand_over(batches)
                self._note_positions()
        finally:
            if fetch is not None:
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)

    async def _result_of(
        self, fetch: asyncio.Task[dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]]
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        try:
            return await fetch
        except asyncio.CancelledError:
            if asyncio.current_task() is not None and asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise  # the reader itself is stopping
            return {}
        except Exception as exc:  # noqa: BLE001 - the broker's trouble: say so, wait, read on
            log.warning("%s: reading failed: %r; again in 1s", self.service, exc)
            await asyncio.sleep(1.0)
            return {}

    def _hand_over(self, batches: Mapping[TopicPartition, Iterable[ConsumerRecord[bytes, bytes]]]) -> None:
        self._hand_to(self._by_tp, batches)

    @staticmethod
    def _hand_to(
        by_tp: Mapping[TopicPartition, Sequence[_View]],
        batches: Mapping[TopicPartition, Iterable[ConsumerRecord[bytes, bytes]]],
    ) -> None:
        for tp, records in batches.items():
            views = by_tp.get(tp)
            if not views:
                continue
            for rec in records:
                for view in views:
                    if rec.offset < view._next.get(tp, 0):
                        continue  # this view started later, or has read it before a rewind
                    view._next[tp] = rec.offset + 1
                    view._receive(rec)

    def _note_positions(self) -> None:
        for tp in self._by_tp:
            position = self._position_now(tp)
            if position is not None and position > self._delivered.get(tp, -1):
                self._delivered[tp] = position
        self._progress.set()
        self._progress.clear()  # a pulse: wakes whoever waits now

    async def _wait_caught_up(self, views: Sequence[_View], timeout_s: float) -> bool:
        probe = self._probe
        if probe is None or self._stopped:
            return False
        tps = sorted({tp for v in views for tp in v._tps})
        if not tps:
            return True
        ends = await probe.end_offsets(tps)
        deadline = time.monotonic() + timeout_s

        def behind() -> bool:
            for view in views:
                for tp in view._tps:
                    if max(view._next.get(tp, 0), self._delivered.get(tp, 0)) < ends[tp]:
                        return True
            return False

        while behind():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._progress.wait(), timeout=min(remaining, _RECHECK_S))
            except TimeoutError:
                # Positions also move without records (transaction markers): have them looked at.
                self._poke()
        return True

    # ----- callbacks, bad records --------------------------------------------------------------------

    def _call(self, callback: Callable[..., object], *args: Any) -> None:
        try:
            outcome = callback(*args)
        except Exception:  # noqa: BLE001 - a view's callback failing must not stop the reader
            log.exception("%s: a view callback failed", self.service)
            return
        if inspect.isawaitable(outcome):
            self._spawn(outcome)

    def _spawn(self, awaitable: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(awaitable)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _bad(self, view: _View, rec: ConsumerRecord[bytes, bytes], reason: str) -> None:
        log.warning("%s: bad record %s[%s]@%s: %s", self.service, rec.topic, rec.partition, rec.offset, reason)
        if view.on_bad_record is not None:
            view.on_bad_record(rec.topic, rec.partition, rec.offset, rec.key, rec.value, reason)
            return
        if self._dead_letters is None:
            return
        letter = dead_letter_of(rec, reason, self.service)
        self._spawn(self._send_letter(letter))

    async def _send_letter(self, letter: DeadLettered, attempts: int = 30) -> None:
        assert self._dead_letters is not None
        for attempt in range(1, attempts + 1):
            try:
                await self._dead_letters(letter)
                return
            except Exception as exc:  # noqa: BLE001 - e.g. the service's broker is not connected yet
                if attempt == attempts:
                    log.error(
                        "%s: could not dead-letter %s@%s: %r", self.service, letter.source_topic, letter.offset, exc
                    )
                    return
                await asyncio.sleep(1.0)
