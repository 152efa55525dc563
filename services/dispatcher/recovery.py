"""What the next owner of an invocation partition reads before it serves it.

Two reads, both bounded: the partition's records on the compacted ``dispatch`` topic (what was
queued or in flight when the previous owner stopped), and the results written since the oldest
of those (and since the first invocation after the committed offset), so work that ended while
no one owned the partition is not run again. ``fold`` is the pure part.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition

from events import InvocationCompleted, codec
from events.dispatch import DispatchState, InvocationQueued, InvocationSent
from services.common.kafkasec import client_options as kafka_client_options
from services.common.resultscan import results_since

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


async def read_partitions(
    bootstrap: str, dispatch_topic: str, invocation_topic: str, resume_at: dict[int, int | None]
) -> list[PartitionState]:
    """Read the ``dispatch`` records of each partition, and the time of its first unconsumed invocation."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        **kafka_client_options(),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
    )
    await consumer.start()
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
