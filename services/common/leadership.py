"""Active/standby copies of a service, with Kafka as the only coordination channel.

Two mechanisms, one for liveness and one for safety:

- **The lease** (who should act): every copy of a service joins one consumer group on a
  one-partition *lease topic* (``<prefix>lease.<service>``); the member assigned partition 0 is
  the active copy, the others stand by. A copy that dies stops heartbeating and the group gives
  the partition to a standby after the session timeout; a copy that stops cleanly leaves the
  group and hands over at once. The assignor (:class:`LeaseAssignor`) keeps the lease where it
  is when a standby joins, so adding a copy does not interrupt the active one.
- **The fence** (whose writes count): the active copy writes *everything* through one
  transactional producer with the service's fixed ``transactional_id`` (:class:`FencedWriter`).
  A new active copy's producer start (``InitProducerId``) aborts the previous holder's open
  transaction and fences its producer: whatever a slow or partitioned former holder still tries
  to write fails with ``ProducerFenced``. Only then does the new copy rebuild its state from
  Kafka (read-committed), so it sees every write the old one committed and none it did not.

Consumed positions are committed inside the same transactions (:class:`Ack`), so "the record was
handled" and "what handling it wrote" become visible together or not at all, and a new active
copy resumes exactly where the old one's last committed transaction left off
(:class:`TermReader`). Readers of these writes must read committed records only.

The pure parts (who gets the lease, how acks merge) are :func:`choose_holder` and
:func:`merge_acks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata
from aiokafka.structs import OffsetAndMetadata
from opentelemetry import propagate

from events import codec
from events.base import Record
from events.topics import Topics, TopicSpec
from services.common.admin import ensure_topics
from services.common.kafkasec import client_options as kafka_client_options
from services.common.views import FETCH_MAX_WAIT_MS, FETCH_ROUTINE_TIMER_MS, partitions_of

__all__ = [
    "Ack",
    "Claim",
    "Consumed",
    "FencedWriter",
    "LeaseAssignor",
    "LeaseLost",
    "Leadership",
    "Out",
    "TermReader",
    "WriterBroken",
    "choose_holder",
    "instance_name",
    "lease_spec",
    "merge_acks",
    "run_loops",
    "trace_headers",
]

log = logging.getLogger("stoker.leadership")

Headers = tuple[tuple[str, bytes], ...]


def instance_name(env: Mapping[str, str], service: str) -> str:
    """This copy's stable name: ``STOKER_INSTANCE_NAME``, else ``<service>-<host>-<pid>``."""
    return env.get("STOKER_INSTANCE_NAME") or f"{service}-{socket.gethostname()}-{os.getpid()}"


LEASE_TOPIC_WAIT_S = 30.0
"""How long a new lease topic may take to show in the metadata before the service gives up (and is restarted)."""


def lease_spec(topics: Topics, service: str) -> TopicSpec:
    """The lease topic of ``service``: one partition, nothing is ever written to it."""
    return TopicSpec(f"{topics.prefix}lease.{service}", partitions=1, retention_ms=60 * 60 * 1000)


# ----- trace context over Kafka headers ---------------------------------------------------------


def trace_headers() -> Headers:
    """The current trace context as Kafka headers (``traceparent``), for a record written now."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple((k, v.encode()) for k, v in carrier.items())


# ----- the lease --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """What one member of a lease group says about itself when it joins."""

    name: str
    """The copy's instance name (the tie-break: with no holder, the first name gets the lease)."""
    held: int = -1
    """The latest group generation in which this copy held the lease; -1 if it does not hold it."""


def choose_holder(claims: Mapping[str, Claim]) -> str | None:
    """The member id that gets the lease.

    The current holder keeps it (a standby joining does not interrupt the active copy). If two
    members claim it (a former holder that was dropped from the group and came back), the one
    that held it in the later generation wins. With no claim, the first instance name (then
    member id) gets it, so the choice does not depend on who joined first.
    """
    if not claims:
        return None
    holders = [(claim.held, member) for member, claim in claims.items() if claim.held >= 0]
    if holders:
        return max(holders)[1]
    return min(claims, key=lambda member: (claims[member].name, member))


def _decode_claim(user_data: bytes | None, member: str) -> Claim:
    try:
        raw = orjson.loads(user_data or b"{}")
        return Claim(name=str(raw.get("name", member)), held=int(raw.get("held", -1)))
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return Claim(name=member)


class LeaseAssignor(AbstractPartitionAssignor):
    """A partition assignor that gives every lease partition to :func:`choose_holder`'s member."""

    name = "stoker-lease"
    version = 0

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.held = -1
        """Set by :class:`Leadership`: the generation in which this copy last held the lease."""

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:  # type: ignore[override]
        user_data = orjson.dumps({"name": self.instance, "held": self.held})
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), user_data)

    def assign(  # type: ignore[override]
        self, cluster: Any, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        claims = {member: _decode_claim(meta.user_data, member) for member, meta in members.items()}
        holder = choose_holder(claims)
        topics = sorted({t for meta in members.values() for t in meta.subscription})
        given: dict[str, list[tuple[str, list[int]]]] = {member: [] for member in members}
        if holder is not None:
            for topic in topics:
                parts = cluster.partitions_for_topic(topic) or set()
                if parts:
                    given[holder].append((topic, sorted(parts)))
        return {
            member: ConsumerProtocolMemberAssignment(self.version, assignment, b"")
            for member, assignment in given.items()
        }

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:  # type: ignore[override]
        pass


class Leadership(ConsumerRebalanceListener):  # type: ignore[misc]
    """Runs a service's active role (``lead``) while this copy holds the lease, and only then.

    ``run(lead)`` waits for the lease, then starts a term: it starts a :class:`FencedWriter` under
    ``transactional_id`` (fencing every earlier holder), confirms *after* that with the group
    coordinator that this copy still holds the lease, and only then runs ``lead(writer)``. The
    order matters: a copy that was paused and lost the lease may still get its producer started
    (fencing the rightful holder, whose term then restarts), but it fails the confirmation and
    writes nothing, so the last copy to start a writer *and* confirm is the only one whose writes
    count. The term is cancelled as soon as the lease is known to be lost (another member got
    it, or no assignment came for a session timeout after a revocation). A term that fails (its
    writer was fenced or broke) ends; a new one starts, after a pause, if this copy still holds the
    lease, and rebuilds everything from Kafka like any new active copy.
    """

    def __init__(
        self,
        bootstrap: str,
        lease: TopicSpec,
        *,
        group_id: str,
        instance: str,
        transactional_id: str,
        session_timeout_ms: int = 6_000,
        heartbeat_interval_ms: int = 2_000,
        on_role: Callable[[str], None] | None = None,
    ) -> None:
        self.lease = lease
        self.group_id = group_id
        self.transactional_id = transactional_id
        self.instance = instance
        self.role = "standby"
        self.terms = 0
        """Terms started by this copy."""
        self._bootstrap = bootstrap
        self._session_s = session_timeout_ms / 1000
        self._heartbeat_ms = heartbeat_interval_ms
        self._on_role = on_role
        self._assignor = LeaseAssignor(instance)
        self._tp = TopicPartition(lease.name, 0)
        self._holding = asyncio.Event()
        self._lost = asyncio.Event()
        self._revoked_at: float | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._poller: asyncio.Task[None] | None = None
        self._term: asyncio.Task[None] | None = None
        self._stopping = False

    @classmethod
    def for_service(
        cls,
        bootstrap: str,
        topics: Topics,
        service: str,
        *,
        instance: str,
        session_timeout_ms: int,
        on_role: Callable[[str], None] | None = None,
    ) -> Leadership:
        """The lease of ``service`` as every Stoker service names it: topic ``lease.<service>``, group
        ``stoker-<service>-lease`` and one transactional id for all its copies (so each fences the last)."""
        return cls(
            bootstrap,
            lease_spec(topics, service),
            group_id=f"stoker-{service}-lease",
            instance=instance,
            transactional_id=f"stoker-{service}-{topics.prefix}",
            session_timeout_ms=session_timeout_ms,
            on_role=on_role,
        )

    @property
    def holding(self) -> bool:
        return self._holding.is_set()

    async def start(self) -> None:
        await ensure_topics(self._bootstrap, [self.lease])
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            **kafka_client_options(),
            client_id=f"stoker-{self.instance}",
            group_id=self.group_id,
            enable_auto_commit=False,
            partition_assignment_strategy=(self._assignor,),
            # The broker's group.min.session.timeout.ms (6 s by default) bounds how fast a dead
            # active copy is replaced; a clean stop leaves the group and hands over at once.
            session_timeout_ms=int(self._session_s * 1000),
            heartbeat_interval_ms=self._heartbeat_ms,
            rebalance_timeout_ms=int(self._session_s * 1000) + 4_000,
            max_poll_interval_ms=int(self._session_s * 1000) + 4_000,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            consumer_timeout_ms=FETCH_ROUTINE_TIMER_MS,
        )
        await self._consumer.start()
        # A topic just created may not be in the metadata this consumer was given yet: subscribed to
        # then, it would wait for the next metadata refresh (minutes) before joining with a partition.
        deadline = time.monotonic() + LEASE_TOPIC_WAIT_S
        while self.lease.name not in await self._consumer.topics():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the lease topic {self.lease.name} is not in the cluster's metadata")
            await asyncio.sleep(0.1)
        self._consumer.subscribe([self.lease.name], listener=self)
        self._poller = asyncio.create_task(self._poll(), name=f"lease:{self.lease.name}")

    async def stop(self) -> None:
        """End the term (if any), then leave the group so a standby takes over at once."""
        self._stopping = True
        self._holding.set()  # wakes a standing-by ``run`` so it sees the stop
        await self._end_term()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._poller
        if self._consumer is not None:
            await self._consumer.stop()

    async def run(self, lead: Callable[[FencedWriter], Coroutine[Any, Any, None]]) -> None:
        """Forever: stand by until this copy holds the lease, then lead until it loses it."""
        failures = 0
        try:
            while not self._stopping:
                await self._holding.wait()
                if self._stopping:
                    break
                if not await self._confirm():
                    await asyncio.sleep(0.2)
                    continue
                self.terms += 1
                term = self._term = asyncio.create_task(self._lead(lead), name=f"term:{self.lease.name}:{self.terms}")
                lost = asyncio.create_task(self._lost.wait())
                try:
                    await asyncio.wait({term, lost}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    lost.cancel()
                failed = term.exception() if term.done() and not term.cancelled() else None
                await self._end_term()
                self._set_role("standby")
                if self._stopping:
                    break
                if failed is not None:
                    failures += 1
                    pause = min(5.0, 0.5 * 2 ** (failures - 1))
                    log.warning(
                        "term %d ended: %r; leading again in %.1fs if still holding the lease",
                        self.terms,
                        failed,
                        pause,
                    )
                    await asyncio.sleep(pause)
                else:
                    failures = 0
                    log.info("%s lost the lease %s: standing by", self.instance, self.lease.name)
        finally:
            await self._end_term()

    async def _lead(self, lead: Callable[[FencedWriter], Coroutine[Any, Any, None]]) -> None:
        began = time.monotonic()
        writer = FencedWriter(self._bootstrap, self.transactional_id, client_id=f"stoker-{self.instance}")
        try:
            await writer.start()  # every earlier holder's producer is fenced from here on
            if not await self._confirm():
                raise LeaseLost("the lease was lost while the writer started")
            self._set_role("active")
            log.info(
                "%s holds the lease %s: active (term %d, fenced in %.2fs)",
                self.instance,
                self.lease.name,
                self.terms,
                time.monotonic() - began,
            )
            await lead(writer)
        finally:
            await writer.stop()

    async def _end_term(self) -> None:
        term, self._term = self._term, None
        if term is not None and not term.done():
            term.cancel()
        if term is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await term

    def _set_role(self, role: str) -> None:
        self.role = role
        if self._on_role is not None:
            self._on_role(role)

    async def _confirm(self) -> bool:
        """Ask the group coordinator whether this member still owns the lease (an offset commit
        is refused for a member that is not in the current generation)."""
        assert self._consumer is not None
        try:
            await asyncio.wait_for(
                self._consumer.commit({self._tp: OffsetAndMetadata(0, self.instance)}), timeout=self._session_s
            )
            return True
        except Exception as exc:  # noqa: BLE001 - any refusal means "not confirmed"
            log.info("lease not confirmed: %r", exc)
            return False

    async def _poll(self) -> None:
        """Keeps the membership alive (and lets the consumer run rebalances); watches a revoked lease."""
        assert self._consumer is not None
        while True:
            try:
                await self._consumer.getmany(timeout_ms=1_000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the membership must outlive a failed poll
                log.warning("polling the lease %s failed: %r", self.lease.name, exc)
                await asyncio.sleep(0.5)
            if self._revoked_at is not None and time.monotonic() - self._revoked_at > self._session_s:
                # Revoked and not given back within a session: the group went on without us.
                self._revoked_at = None
                self._lose("no assignment within the session timeout after a revocation")

    # ----- ConsumerRebalanceListener ----------------------------------------------------------

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # The active copy keeps acting until the rebalance says where the lease went: it usually
        # comes straight back (a standby joined), and if it moves, the new holder's fence stops
        # every write made after that point anyway.
        if self.holding:
            self._revoked_at = time.monotonic()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._revoked_at = None
        generation = getattr(getattr(self._consumer, "_coordinator", None), "generation", 0)
        if self._tp in set(assigned):
            self._assignor.held = max(int(generation), 0)
            if not self.holding:
                self._lost.clear()
                self._holding.set()
        elif self.holding:
            self._lose("the lease was assigned to another copy")

    def _lose(self, why: str) -> None:
        log.info("%s: lease %s lost: %s", self.instance, self.lease.name, why)
        self._assignor.held = -1
        self._holding.clear()
        self._lost.set()


async def run_loops(loops: Sequence[Coroutine[Any, Any, None]], failed: asyncio.Future[None] | None = None) -> None:
    """Run a term's loops until one of them fails (or ``failed`` does, e.g. the writer's); then
    cancel the others and raise that failure. Cancelling this cancels them all."""
    tasks = [asyncio.ensure_future(loop) for loop in loops]
    watched: set[asyncio.Future[Any]] = set(tasks)
    if failed is not None:
        watched.add(failed)
    try:
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        for fut in done:
            if not fut.cancelled() and fut.exception() is not None:
                raise fut.exception()  # type: ignore[misc]
        raise RuntimeError("a term's loop ended")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ----- the fence: every write of the active copy ------------------------------------------------


@dataclass(frozen=True)
class Out:
    """One record the active copy writes."""

    topic: str
    record: Record
    key: str | None = None
    partition: int | None = None
    headers: Headers = field(default_factory=trace_headers)
    """The trace context where the record was decided (taken when the ``Out`` is made)."""


@dataclass(frozen=True)
class Ack:
    """A position to commit with the writes: ``group`` has handled ``topic[partition]`` below ``offset``."""

    group: str
    topic: str
    partition: int
    offset: int


def merge_acks(acks: Iterable[Ack]) -> dict[str, dict[TopicPartition, int]]:
    """Positions per group and partition; the furthest wins (callers ack in reading order)."""
    merged: dict[str, dict[TopicPartition, int]] = {}
    for ack in acks:
        tp = TopicPartition(ack.topic, ack.partition)
        group = merged.setdefault(ack.group, {})
        group[tp] = max(group.get(tp, ack.offset), ack.offset)
    return merged


class LeaseLost(RuntimeError):
    """This copy does not hold the lease (any more)."""


class WriterBroken(RuntimeError):
    """The writer can write no more (fenced by a newer holder, or its producer failed)."""


class FencedWriter:
    """The active copy's only way to write: transactions under the service's one transactional id.

    ``write(outs, acks)`` returns once the records and the consumed positions are committed
    together. Writes that arrive while a transaction is under way share the next one (a
    transaction costs a few broker round trips, whatever it holds). After any failure the writer
    is broken for good: the term ends and the next one starts from what Kafka has.
    """

    def __init__(
        self,
        bootstrap: str,
        transactional_id: str,
        *,
        client_id: str,
        transaction_timeout_ms: int = 15_000,
    ) -> None:
        self.transactional_id = transactional_id
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            **kafka_client_options(),
            client_id=client_id,
            transactional_id=transactional_id,
            enable_idempotence=True,
            acks="all",
            linger_ms=0,
            request_timeout_ms=10_000,
            # A holder that dies mid-transaction holds back read-committed readers of the partitions
            # it wrote to until its successor's start aborts it, or until this timeout.
            transaction_timeout_ms=transaction_timeout_ms,
            retry_backoff_ms=10,
        )
        self._queue: list[tuple[list[Out], list[Ack], asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._known_topics: set[str] = set()
        self.broken: BaseException | None = None
        self.failed: asyncio.Future[None] | None = None
        """Fails when the writer breaks (a term waits on it next to its own loops)."""
        self.transactions = 0

    async def start(self) -> None:
        """Start the producer: this fences every earlier producer with the same transactional id."""
        self.failed = asyncio.get_running_loop().create_future()
        self.failed.add_done_callback(_retrieved)
        await self._producer.start()
        self._task = asyncio.create_task(self._loop(), name=f"writer:{self.transactional_id}")

    async def stop(self, timeout_s: float = 5.0) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._fail_queued(WriterBroken("the writer stopped"))
        try:
            await asyncio.wait_for(self._producer.stop(), timeout_s)
        except Exception as exc:  # noqa: BLE001 - a fenced producer may fail to flush; nothing of it counts
            log.debug("writer stop: %r", exc)
        if self.failed is not None and not self.failed.done():
            self.failed.cancel()

    async def write(self, outs: Sequence[Out] = (), acks: Sequence[Ack] = ()) -> None:
        """Write ``outs`` and commit ``acks`` in one transaction (shared with concurrent writes)."""
        await self.submit(outs, acks)

    def submit(self, outs: Sequence[Out] = (), acks: Sequence[Ack] = ()) -> asyncio.Future[None]:
        """Queue ``outs`` and ``acks`` for the next transaction; the future resolves once it committed.

        Submissions are written in the order they are made (a later one is in the same transaction
        or a later one), so a caller that keeps its own order need not wait before submitting more.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.add_done_callback(_retrieved)  # a caller that does not wait learns of it via ``failed``
        if self.broken is not None:
            done.set_exception(WriterBroken(f"the writer is broken: {self.broken!r}"))
        elif not outs and not acks:
            done.set_result(None)
        else:
            self._queue.append((list(outs), list(acks), done))
            self._wake.set()
        return done

    async def topic_exists(self, topic: str, timeout_s: float = 2.0) -> bool:
        """Whether ``topic`` exists (a write to a missing topic would fail the whole transaction)."""
        if topic in self._known_topics:
            return True
        try:
            parts = await asyncio.wait_for(self._producer.partitions_for(topic), timeout_s)
        except Exception:  # noqa: BLE001 - unknown or unreachable: do not put it in a transaction
            return False
        if parts:
            self._known_topics.add(topic)
        return bool(parts)

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            try:
                await self._transaction(batch)
            except asyncio.CancelledError:
                self._fail(batch, WriterBroken("the writer stopped"))
                raise
            except Exception as exc:  # noqa: BLE001 - fenced or failed: this writer is done
                log.warning("transaction of %s failed: %r", self.transactional_id, exc)
                self._fail(batch, exc)
                return
            self.transactions += 1
            for _outs, _acks, done in batch:
                if not done.done():
                    done.set_result(None)

    async def _transaction(self, batch: list[tuple[list[Out], list[Ack], asyncio.Future[None]]]) -> None:
        async with self._producer.transaction():
            for outs, _acks, _done in batch:
                for out in outs:
                    delivery = await self._producer.send(
                        out.topic,
                        codec.encode(out.record),
                        key=out.key.encode() if out.key is not None else None,
                        partition=out.partition,
                        headers=list(out.headers),
                    )
                    delivery.add_done_callback(_retrieved)  # the commit reports any failure
            for group, offsets in merge_acks(a for _outs, acks, _done in batch for a in acks).items():
                await self._producer.send_offsets_to_transaction(offsets, group)

    def _fail(self, batch: list[tuple[list[Out], list[Ack], asyncio.Future[None]]], exc: BaseException) -> None:
        self.broken = exc
        for _outs, _acks, done in batch:
            if not done.done():
                done.set_exception(WriterBroken(f"transaction failed: {exc!r}"))
        self._fail_queued(WriterBroken(f"transaction failed: {exc!r}"))
        if self.failed is not None and not self.failed.done():
            self.failed.set_exception(WriterBroken(f"transaction failed: {exc!r}"))

    def _fail_queued(self, exc: BaseException) -> None:
        queued, self._queue = self._queue, []
        for _outs, _acks, done in queued:
            if not done.done():
                done.set_exception(exc)


def _retrieved(fut: asyncio.Future[Any]) -> None:
    """Mark a future's failure as seen (it is reported elsewhere), so asyncio does not log it."""
    if not fut.cancelled():
        fut.exception()


# ----- reading from committed positions ---------------------------------------------------------


@dataclass(frozen=True)
class Consumed:
    """One record read by a :class:`TermReader`: decoded, or ``record=None`` with the ``reason``."""

    record: Record | None
    reason: str
    group: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers

    @property
    def ack(self) -> Ack:
        """The position after this record, to commit with what handling it wrote."""
        return Ack(self.group, self.topic, self.partition, self.offset + 1)

    def context(self) -> Any:
        """The trace context the record was written in."""
        return propagate.extract({k: v.decode("latin-1") for k, v in self.headers if v is not None})


class TermReader:
    """Reads every partition of a topic from ``group``'s committed positions, read-committed.

    It does not join ``group`` (the lease decides who reads); the group only stores positions,
    which the active copy commits through its :class:`FencedWriter`. With no committed position
    it starts at ``reset`` (``earliest`` or ``latest``).
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group: str,
        expected: tuple[type[Record], ...],
        *,
        client_id: str,
        reset: str = "earliest",
    ) -> None:
        self.topic = topic
        self.group = group
        self._expected = expected
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            **kafka_client_options(),
            client_id=client_id,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset=reset,
            isolation_level="read_committed",
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,  # a fetch returns as soon as data arrives: only an idle poll waits
            consumer_timeout_ms=FETCH_ROUTINE_TIMER_MS,
        )

    async def start(self) -> None:
        await self._consumer.start()
        tps = await partitions_of(self._consumer, self.topic)
        self._consumer.assign(tps)
        for tp in tps:
            await self._consumer.position(tp)  # resolve the committed position now

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self._consumer.stop()

    async def batch(self, timeout_ms: int = 500) -> list[Consumed]:
        """The next records (possibly none after ``timeout_ms``), in offset order per partition."""
        out: list[Consumed] = []
        for tp, records in (await self._consumer.getmany(timeout_ms=timeout_ms)).items():
            for rec in records:
                record: Record | None = None
                reason = ""
                try:
                    record = codec.decode(rec.value, self._expected)
                except codec.DecodeError as exc:
                    reason = exc.reason
                out.append(
                    Consumed(
                        record=record,
                        reason=reason,
                        group=self.group,
                        topic=tp.topic,
                        partition=tp.partition,
                        offset=rec.offset,
                        key=rec.key,
                        value=rec.value,
                        headers=tuple(rec.headers or ()),
                    )
                )
        return out
