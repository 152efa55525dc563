"""Topic administration: create the catalogue's topics (idempotently)."""

from __future__ import annotations

import asyncio
import time

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from events.topics import TopicSpec
from services.common.kafkasec import client_options as kafka_client_options


async def ensure_topics(bootstrap: str, specs: list[TopicSpec], timeout_s: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; returns the names created."""
    deadline = time.monotonic() + timeout_s
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **kafka_client_options(), request_timeout_ms=10_000)
        try:
            await admin.start()
            break
        except KafkaConnectionError:
            await admin.close()
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if missing:
            try:
                await admin.create_topics(
                    [
                        NewTopic(s.name, num_partitions=s.partitions, replication_factor=1, topic_configs=s.configs())
                        for s in missing
                    ]
                )
            except TopicAlreadyExistsError:
                pass  # another process won the race; that is the state we wanted
        return [s.name for s in missing]
    finally:
        await admin.close()
