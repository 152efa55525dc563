"""The throttler's subscriber: node metrics in, handed to :class:`~services.throttler.core.ThrottlerCore`."""

from __future__ import annotations

from faststream.kafka import KafkaBroker
from faststream.middlewares import AckPolicy

from events import NodeMetrics, Topics, now_ms
from services.common.views import FETCH_ROUTINE_TIMER_MS
from services.throttler.core import ThrottlerCore

GROUP = "stoker-throttler"


def subscribe(broker: KafkaBroker, topics: Topics, core: ThrottlerCore) -> None:
    """Feed every node's metrics to ``core``."""

    # Metrics are a stream of snapshots: one lost to a restart is replaced by the next interval.
    @broker.subscriber(
        topics.node_metric,
        group_id=GROUP,
        auto_offset_reset="latest",
        ack_policy=AckPolicy.ACK,
        consumer_timeout_ms=FETCH_ROUTINE_TIMER_MS,
    )
    async def on_metrics(metrics: NodeMetrics) -> None:
        await core.on_metrics(metrics, now_ms())
