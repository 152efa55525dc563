"""Thin handlers: invocation records -> Dispatcher."""

from __future__ import annotations

from faststream.kafka import KafkaBroker
from faststream.middlewares import AckPolicy

from events import InvocationRequested
from services.dispatcher.core import Dispatcher


def register(broker: KafkaBroker, dispatcher: Dispatcher) -> None:
    # Offsets are committed after the Execute command (or the terminal result) was confirmed
    # by the broker: a crash before that re-reads the invocation, and the dedup by id (plus the
    # agent's own dedup) keeps it from running twice in the common case.
    @broker.subscriber(
        dispatcher.topics.invocation,
        group_id="stoker-dispatcher",
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.NACK_ON_ERROR,
        fetch_max_wait_ms=100,
    )
    async def on_invocation(invocation: InvocationRequested) -> None:
        await dispatcher.on_invocation(invocation)
