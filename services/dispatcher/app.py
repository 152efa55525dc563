"""Composition root of the dispatcher."""

from __future__ import annotations

import asyncio
from typing import Any

from events import (
    FunctionSpec,
    InstanceChanged,
    InvocationCompleted,
    NodeHeartbeat,
    NodeStopped,
    PlacementOverride,
    WorkflowSpec,
)
from events.base import Record
from events.cluster import NodeObserved
from services.common.broker import dead_letter_for, make_broker
from services.common.runner import configure_logging, serve
from services.common.table import CompactedTable, TopicTail
from services.common.telemetry import setup_tracing
from services.dispatcher import handlers
from services.dispatcher.core import Dispatcher
from services.dispatcher.settings import DispatcherSettings


async def run(settings: DispatcherSettings) -> None:
    configure_logging(settings.common)
    common = settings.common
    provider = setup_tracing("dispatcher", common)
    broker = make_broker(common, "dispatcher", provider)

    async def publish(record: Record, topic: str, key: str | None) -> Any:
        return await broker.publish(record, topic, key=key.encode() if key else None)

    pending_letters: set[asyncio.Task[Any]] = set()

    def dead_letter(topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, why: str) -> None:
        # The dispatcher is the one reader that dead-letters bad records of the shared views
        # (functions, nodes, results), so each bad record is reported once, not by every reader.
        letter = dead_letter_for(
            topic=topic, partition=partition, offset=offset, key=key, value=value, reason=why, consumer="dispatcher"
        )
        task = asyncio.ensure_future(publish(letter, common.topics.dlq, letter.key))
        pending_letters.add(task)
        task.add_done_callback(pending_letters.discard)

    functions: CompactedTable[FunctionSpec] = CompactedTable(
        common.bootstrap, common.topics.function, (FunctionSpec,), on_bad_record=dead_letter
    )

    async def lookup(name: str) -> FunctionSpec | None:
        spec = functions.get(name)
        if spec is None and await functions.wait_caught_up(timeout_s=2.0):
            spec = functions.get(name)  # read-your-writes: the spec may have just been published
        return spec

    overrides: CompactedTable[PlacementOverride] = CompactedTable(
        common.bootstrap, common.topics.placement, (PlacementOverride,), on_bad_record=dead_letter
    )
    workflows: CompactedTable[WorkflowSpec] = CompactedTable(
        common.bootstrap, common.topics.workflow, (WorkflowSpec,), on_bad_record=dead_letter
    )

    async def is_workflow(name: str) -> bool:
        if workflows.get(name) is None:
            await workflows.wait_caught_up(timeout_s=1.0)
        return workflows.get(name) is not None

    dispatcher = Dispatcher(settings, publish, lookup, overrides.get, is_workflow)
    node_events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    nodes: CompactedTable[Any] = CompactedTable(
        common.bootstrap,
        common.topics.node,
        (NodeHeartbeat, NodeStopped, NodeObserved),
        on_change=lambda name, rec: node_events.put_nowait((name, rec)),
        on_bad_record=dead_letter,
    )
    results = TopicTail(
        common.bootstrap,
        common.topics.result,
        (InvocationCompleted,),
        dispatcher.on_result,
        on_bad_record=dead_letter,
    )
    instances = TopicTail(common.bootstrap, common.topics.instance, (InstanceChanged,), dispatcher.on_instance)
    handlers.register(broker, dispatcher)

    async def start_views() -> None:
        # Results first: every Execute sent from now on must have its result seen.
        await results.start()
        await functions.start()
        await nodes.start()
        await overrides.start()
        await workflows.start()
        await instances.start()

    async def apply_node_events() -> None:
        while True:
            name, record = await node_events.get()
            await dispatcher.on_node(name, record)

    async def tick() -> None:
        while True:
            await asyncio.sleep(settings.tick_s)
            await dispatcher.tick()

    async def stop_views() -> None:
        for view in (results, functions, nodes, instances, overrides, workflows):
            await view.stop()

    await serve(
        "dispatcher", common, broker, on_start=[start_views], background=[apply_node_events, tick], on_stop=[stop_views]
    )
    provider.shutdown()
