"""What the next owner of an invocation partition reads before it serves it.

Three reads, all bounded: the partition's records on the compacted ``dispatch`` topic (what was
queued, or in flight for a while, when the previous owner stopped); the Execute commands in the
tail of the work topics whose ``stoker-source`` header names an invocation at or after the
committed offset (work sent but not yet recorded: its offset was never committed, so it lies in
the part of the partition that is read again); and the results written since the oldest of those
(and since the first invocation after the committed offset), so work that ended while no one owned
the partition is not run again. ``fold``, ``sent_of`` and ``merge`` are the pure parts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from events import Execute, InvocationCompleted, codec
from events.dispatch import DispatchState, InvocationQueued, InvocationSent
from events.work import SOURCE_HEADER, parse_source_header
from services.common.kafkasec import client_options as kafka_client_options
from services.common.resultscan import read_since, results_since
from services.common.views import partitions_of

log = logging.getLogger("stoker.dispatcher.recovery")

CLOCK_SLACK_MS = 60_000
"""Results are searched from this long before the oldest recovered record: clocks of clients,
nodes and brokers differ a little, and a record's timestamp is its producer's clock."""


@dataclass
class PartitionState:
    """One invocation partition as the ``dispatch`` topic and the results have it."""

    partition: int
    states: dict[str, DispatchState] = field(default_factory=dict)
    resume_ms: int | None = None
    """Timestamp of the first invocation after the committed offset (None: nothing to re-read)."""

    @property
    def oldest_ms(self) -> int | None:
        times = [s.dispatched_ms if isinstance(s, InvocationSent) else s.since_ms for s in self.states.values()]
        if self.resume_ms is not None:
            times.append(self.resume_ms)
        return min(times) if times else None


def fold(records: Iterable[tuple[bytes | None, bytes | None]]) -> tuple[dict[str, DispatchState], list[str]]:
    """The latest state per invocation id from a partition's records (key, value), in offset order.

    Returns the states and the reasons of records that could not be read (each is skipped).
    """
    states: dict[str, DispatchState] = {}
    problems: list[str] = []
    for key, value in records:
        if key is None:
            problems.append("a dispatch record without a key")
            continue
        ident = key.decode("utf-8", errors="replace")
        if not value:
            states.pop(ident, None)
            continue
        try:
            record = codec.decode(value, (InvocationQueued, InvocationSent))
        except codec.DecodeError as exc:
            problems.append(f"dispatch record {ident}: {exc.reason}")
            continue
        states[ident] = record  # type: ignore[assignment]
    return states, problems


def sent_of(
    node: str, headers: Sequence[tuple[str, bytes]] | None, value: bytes | None, after: Mapping[int, int]
) -> tuple[int, InvocationSent] | None:
    """The hand-off an Execute on ``node``'s work topic records, if its source is a partition of
    ``after`` at or past that partition's offset: ``(partition, state)``, else None.

    The header decides before anything is decoded; an Execute that does not decode is skipped
    (the agent dead-letters it, and its invocation is dispatched again when it is re-read).
    """
    source = next((v for k, v in headers or () if k == SOURCE_HEADER), None)
    where = parse_source_header(source) if source is not None else None
    if where is None or where[0] not in after or where[1] < after[where[0]]:
        return None
    try:
        cmd = codec.decode(value, (Execute,))
    except codec.DecodeError:
        return None
    assert isinstance(cmd, Execute)
    return where[0], InvocationSent(
        invocation=cmd.invocation,
        source_offset=where[1],
        node=node,
        incarnation=cmd.incarnation,
        attempt=cmd.attempt,
        dispatched_ms=cmd.dispatched_ms,
    )


def merge(states: dict[str, DispatchState], found: Iterable[InvocationSent]) -> set[str]:
    """Add to ``states`` the hand-offs found in the work topics that it does not know of (or knows
    an earlier attempt of); returns their ids, the work with no ``dispatch`` record."""
    taken: set[str] = set()
    for sent in found:
        ident = sent.invocation.id
        known = states.get(ident)
        if (
            known is None
            or known.attempt < sent.attempt
            # an Execute comes after the record that queued the same attempt
            or (isinstance(known, InvocationQueued) and known.attempt == sent.attempt)
            or (ident in taken and known.attempt == sent.attempt)
        ):
            states[ident] = sent
            taken.add(ident)
    return taken


async def read_partitions(
    bootstrap: str, dispatch_topic: str, invocation_topic: str, resume_at: dict[int, int | None]
) -> list[PartitionState]:
    """Read the ``dispatch`` records of each partition, and the time of its first unconsumed invocation."""
    consumer = await _scanner(bootstrap)
    try:
        out = []
        for partition, committed in resume_at.items():
            tp = TopicPartition(dispatch_topic, partition)
            records = await _read_to_end(consumer, tp, None)
            states, problems = fold((r.key, r.value) for r in records)
            for problem in problems:
                log.warning("partition %d: %s", partition, problem)
            state = PartitionState(partition, states)
            inv_tp = TopicPartition(invocation_topic, partition)
            first = await _first_at(consumer, inv_tp, committed or 0)
            state.resume_ms = first
            out.append(state)
        return out
    finally:
        await consumer.stop()


async def unrecorded_sends(
    bootstrap: str, work_prefix: str, resume: Mapping[int, tuple[int, int]]
) -> dict[int, list[InvocationSent]]:
    """Executes in every work topic (``<work_prefix><node>``) for invocations at or after the
    committed offset of each partition of ``resume`` (partition -> (offset, timestamp of the
    record there)), written since the earliest of those timestamps less the clock slack."""
    if not resume:
        return {}
    after = {p: offset for p, (offset, _) in resume.items()}
    since = min(ms for _, ms in resume.values()) - CLOCK_SLACK_MS
    consumer = await _scanner(bootstrap)
    found: dict[int, list[InvocationSent]] = {}
    try:
        topics = sorted(t for t in await consumer.topics() if t.startswith(work_prefix))
        tps = [tp for topic in topics for tp in await partitions_of(consumer, topic)]

        def take(rec: ConsumerRecord[bytes, bytes]) -> None:
            hit = sent_of(rec.topic[len(work_prefix) :], rec.headers, rec.value, after)
            if hit is not None:
                found.setdefault(hit[0], []).append(hit[1])

        await read_since(consumer, tps, since, take)
        return found
    finally:
        await consumer.stop()


async def ended_since(
    bootstrap: str, result_topic: str, since_ms: int, wanted: Callable[[str], bool]
) -> tuple[set[str], list[InvocationCompleted]]:
    """Ids of every result written since ``since_ms`` (less the slack), and the results ``wanted`` asks for."""
    started = time.monotonic()
    ids, results = await results_since(bootstrap, result_topic, since_ms - CLOCK_SLACK_MS, wanted)
    log.info(
        "read %d results of the last %.0f s in %.2f s",
        len(ids),
        (time.time() * 1000 - since_ms) / 1000,
        time.monotonic() - started,
    )
    return ids, results


async def _scanner(bootstrap: str) -> AIOKafkaConsumer:
    """A started consumer of no group, for the bounded reads of a takeover."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        **kafka_client_options(),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    return consumer


async def _read_to_end(consumer: AIOKafkaConsumer, tp: TopicPartition, limit: int | None) -> list:  # type: ignore[type-arg]
    consumer.assign([tp])
    end = (await consumer.end_offsets([tp]))[tp]
    if end == 0:
        return []
    await consumer.seek_to_beginning(tp)
    records = []
    while await consumer.position(tp) < end:
        batches = await consumer.getmany(tp, timeout_ms=200)
        for rec in batches.get(tp, []):
            if rec.offset < end:
                records.append(rec)
            if limit is not None and len(records) >= limit:
                return records
    return records


async def _first_at(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> int | None:
    """Timestamp of the first record at or after ``offset`` (None when there is none)."""
    consumer.assign([tp])
    end = (await consumer.end_offsets([tp]))[tp]
    if offset >= end:
        return None
    consumer.seek(tp, offset)
    while True:
        batches = await consumer.getmany(tp, timeout_ms=200, max_records=1)
        for rec in batches.get(tp, []):
            return int(rec.timestamp)
        if await consumer.position(tp) >= end:
            return None
