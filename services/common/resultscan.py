"""One pass over the ``result`` topic since a time: which invocations ended, and the results asked for.

For a new owner of work (a dispatcher taking over invocation partitions, a trigger copy taking over
source partitions): what ended while nobody was watching. The live views of ``result`` never replay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from events import InvocationCompleted, codec
from services.common.kafkasec import client_options as kafka_client_options
from services.common.views import partitions_of


async def results_since(
    bootstrap: str, result_topic: str, since_ms: int, wanted: Callable[[str], bool]
) -> tuple[set[str], list[InvocationCompleted]]:
    """Ids of every result written at or after ``since_ms`` and before this call, and the decodable
    results whose id ``wanted`` accepts (only those are decoded)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        **kafka_client_options(),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    ids: set[str] = set()
    results: list[InvocationCompleted] = []
    try:
        tps = await partitions_of(consumer, result_topic)

        def take(rec: ConsumerRecord[bytes, bytes]) -> None:
            if rec.key is None:
                return
            ident = rec.key.decode("utf-8", errors="replace")
            ids.add(ident)
            if wanted(ident):
                try:
                    results.append(codec.decode(rec.value, (InvocationCompleted,)))  # type: ignore[arg-type]
                except codec.DecodeError:
                    return  # the live readers of ``result`` dead-letter it

        await read_since(consumer, tps, since_ms, take)
        return ids, results
    finally:
        await consumer.stop()


async def read_since(
    consumer: AIOKafkaConsumer,
    tps: Sequence[TopicPartition],
    since_ms: int,
    take: Callable[[ConsumerRecord[bytes, bytes]], None],
) -> None:
    """Hand ``take`` every record of ``tps`` written at or after ``since_ms`` and before this call
    (by the partitions' end offsets now), in offset order per partition."""
    if not tps:
        return
    consumer.assign(list(tps))
    ends = await consumer.end_offsets(list(tps))
    starts = await consumer.offsets_for_times({tp: max(0, since_ms) for tp in tps})
    todo = []
    for tp in tps:
        at = starts.get(tp)
        if at is None or at.offset >= ends[tp]:
            continue  # nothing written since then on this partition
        consumer.seek(tp, at.offset)
        todo.append(tp)
    while todo:
        batches = await consumer.getmany(*todo, timeout_ms=200)
        for tp, records in batches.items():
            for rec in records:
                if rec.offset < ends[tp]:
                    take(rec)
        todo = [tp for tp in todo if await consumer.position(tp) < ends[tp]]
