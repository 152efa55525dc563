"""Composition root of the dispatcher: its producer, its views, the intake and the core."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaProducer
from opentelemetry import propagate

from events import (
    FunctionSpec,
    InstanceChanged,
    InvocationCompleted,
    NodeHeartbeat,
    NodeStopped,
    PlacementOverride,
    WorkflowSpec,
    codec,
)
from events.base import Record
from events.cluster import NodeObserved
from events.dlq import DeadLettered
from services.common.broker import dead_letter_for
from services.common.kafkasec import client_options as kafka_client_options
from services.common.runner import configure_logging, serve
from services.common.telemetry import setup_tracing
from services.common.views import Reader
from services.dispatcher.core import Dispatcher
from services.dispatcher.intake import Intake
from services.dispatcher.settings import DispatcherSettings


def _headers(extra: list[tuple[str, bytes]] | None) -> list[tuple[str, bytes]]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)  # the current span (the invocation's process span) becomes the parent
    headers = [(k, v.encode()) for k, v in carrier.items()]
    if extra:
        headers.extend(extra)
    return headers


async def run(settings: DispatcherSettings) -> None:
    configure_logging(settings.common)
    common = settings.common
    provider = setup_tracing("dispatcher", common)
    producer = AIOKafkaProducer(
        bootstrap_servers=common.bootstrap,
        **kafka_client_options(),
        client_id=f"stoker-{settings.instance_name}",
        acks="all",
        enable_idempotence=True,
        linger_ms=0,
        request_timeout_ms=15_000,
    )

    async def send(
        record: Record | bytes | None,
        topic: str,
        key: str | None,
        partition: int | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Any:
        value = record if isinstance(record, bytes) or record is None else codec.encode(record)
        return await producer.send(
            topic,
            value,
            key=key.encode() if key is not None else None,
            partition=partition,
            headers=_headers(headers) if record is not None else None,
        )

    async def dead_letter_record(
        topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, why: str
    ) -> Any:
        letter = dead_letter_for(
            topic=topic, partition=partition, offset=offset, key=key, value=value, reason=why, consumer="dispatcher"
        )
        return await send(letter, common.topics.dlq, letter.key, None)

    async def to_dlq(letter: DeadLettered) -> None:
        await (await send(letter, common.topics.dlq, letter.key, None))

    # One reader for every view: tables of the compacted topics, tails of results and instances.
    reader = Reader(common.bootstrap, "dispatcher", dead_letters=to_dlq)
    functions = reader.table(common.topics.function, (FunctionSpec,))

    async def lookup(name: str) -> FunctionSpec | None:
        spec = functions.get(name)
        if spec is None and await functions.wait_caught_up(timeout_s=2.0):
            spec = functions.get(name)  # read-your-writes: the spec may have just been published
        return spec

    overrides = reader.table(common.topics.placement, (PlacementOverride,))
    workflows = reader.table(common.topics.workflow, (WorkflowSpec,))

    async def is_workflow(name: str) -> bool:
        if workflows.get(name) is None:
            await workflows.wait_caught_up(timeout_s=1.0)
        return workflows.get(name) is not None

    dispatcher = Dispatcher(settings, send, lookup, overrides.get, is_workflow)

    async def intake_dead_letter(
        topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, why: str
    ) -> Any:
        return await dead_letter_record(topic, partition, offset, key, value, why)

    intake = Intake(settings, dispatcher, intake_dead_letter, client_id=f"stoker-{settings.instance_name}")
    node_events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    reader.table(
        common.topics.node,
        (NodeHeartbeat, NodeStopped, NodeObserved),
        on_change=lambda name, rec: node_events.put_nowait((name, rec)),
        traced=False,  # a heartbeat is its own one-span trace
    )

    def holds(key: bytes | None) -> bool:
        return key is not None and dispatcher.wants_result(key.decode("utf-8", errors="replace"))

    reader.tail(common.topics.result, (InvocationCompleted,), dispatcher.on_result, accept_key=holds)
    reader.tail(common.topics.instance, (InstanceChanged,), dispatcher.on_instance, traced=False)

    async def start() -> None:
        await producer.start()
        # The results tail fixes its start before any Execute is sent: no result can be missed.
        await reader.start()
        while not node_events.empty():  # the nodes as they are now, before any invocation is routed
            name, record = node_events.get_nowait()
            await dispatcher.on_node(name, record)
        await intake.start()

    async def apply_node_events() -> None:
        while True:
            name, record = await node_events.get()
            await dispatcher.on_node(name, record)

    async def tick() -> None:
        while True:
            await asyncio.sleep(settings.tick_s if not dispatcher.idle else 1.0)
            await dispatcher.tick()

    async def stop() -> None:
        await intake.stop()
        await reader.stop()
        await producer.stop()

    await serve(
        settings.instance_name,
        common,
        None,
        on_start=[start],
        background=[intake.run, intake.commit_loop, apply_node_events, tick],
        on_stop=[stop],
    )
    provider.shutdown()
