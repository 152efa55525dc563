"""The pool manager's handlers: what one term as the active copy does with what it reads.

Thin: every decision is :class:`~services.poolmgr.core.PoolManager`'s. :class:`Relay` hands the
views' events to the current term's core (none while this copy stands by); the loops feed a
term's core its nodes, its keep-alive tick and the prewarm topic's records.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from events import InstanceChanged
from services.common.leadership import Consumed
from services.poolmgr.core import PoolManager

tracer = trace.get_tracer("stoker.poolmgr")

GROUP = "stoker-poolmgr"
"""The consumer group whose committed position on the prewarm topic the active copy carries on from."""


class Relay:
    """Hands view events to the current term (none while this copy stands by)."""

    def __init__(self) -> None:
        self.core: PoolManager | None = None
        self.nodes: asyncio.Queue[tuple[str, Any]] | None = None

    def node(self, name: str, record: Any) -> None:
        """A row of the node topic changed: queued for the term's core, which applies it in order."""
        if self.nodes is not None:
            self.nodes.put_nowait((name, record))

    def instance(self, event: InstanceChanged) -> None:
        """An instance event: the term's core counts it towards its prewarms."""
        if self.core is not None:
            self.core.on_instance(event)


async def follow_nodes(core: PoolManager, nodes: asyncio.Queue[tuple[str, Any]]) -> None:
    """Apply the node topic's changes to ``core``, in the order they came."""
    while True:
        name, record = await nodes.get()
        await core.on_node(name, record)


async def keepalive(core: PoolManager, tick_s: float) -> None:
    """The keep-alive policy's tick, every ``tick_s``."""
    while True:
        await asyncio.sleep(tick_s)
        await core.keepalive_tick()


async def on_prewarm(core: PoolManager, item: Consumed) -> None:
    """One record of the prewarm topic, handled in a consumer span of the trace it was written in."""
    attributes: dict[str, str | int] = {
        "messaging.system": "kafka",
        "messaging.destination.name": item.topic,
        "messaging.kafka.message.offset": item.offset,
        "messaging.consumer.group.name": GROUP,
    }
    with tracer.start_as_current_span(
        f"{item.topic} process", context=item.context(), kind=SpanKind.CONSUMER, attributes=attributes
    ):
        await core.on_prewarm(item)


async def intake(core: PoolManager, batch: Callable[[], Awaitable[list[Consumed]]]) -> None:
    """The prewarm topic's records, batch by batch, in the topic's order."""
    while True:
        for item in await batch():
            await on_prewarm(core, item)
