"""Read the ``result`` topic since a time for the results of one trigger's invocations."""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer, TopicPartition

from events import InvocationCompleted, codec
from services.common.views import partitions_of

log = logging.getLogger("stoker.trigger.scan")


async def results_since(bootstrap: str, result_topic: str, prefix: str, since_ms: int) -> list[InvocationCompleted]:
    """Every decodable result whose key (the invocation id) starts with ``prefix``, written at or
    after ``since_ms`` and before this call."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    wanted = prefix.encode()
    found: list[InvocationCompleted] = []
    try:
        tps: list[TopicPartition] = await partitions_of(consumer, result_topic)
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.offsets_for_times({tp: since_ms for tp in tps})
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
                    if rec.offset >= ends[tp] or rec.key is None or not rec.key.startswith(wanted):
                        continue
                    try:
                        result = codec.decode(rec.value, (InvocationCompleted,))
                    except codec.DecodeError:
                        continue  # other readers of ``result`` dead-letter it
                    found.append(result)  # type: ignore[arg-type]
            todo = [tp for tp in todo if await consumer.position(tp) < ends[tp]]
        return found
    finally:
        await consumer.stop()
