"""Composition root of the throttler: node metrics in; Clamp/Recycle commands, placement overrides
and ``throttle.decided`` events out."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from faststream.middlewares import AckPolicy

from events import (
    Clamp,
    FunctionSpec,
    NodeHeartbeat,
    NodeMetrics,
    NodeStopped,
    PlacementOverride,
    Recycle,
    ThrottleDecided,
    now_ms,
)
from events.cluster import NodeObserved
from services.common.broker import make_broker
from services.common.runner import configure_logging, serve
from services.common.settings import CommonSettings, env_float, env_int
from services.common.telemetry import setup_tracing
from services.common.views import FETCH_ROUTINE_TIMER_MS, Reader, Table, dead_letters_to
from services.throttler.fairness import NodeCapacity, NodePressure, pressure_of, read_host_pressure
from services.throttler.policy import Action, PolicyConfig, Throttler
from services.throttler.ranges import RangeConfig

log = logging.getLogger("stoker.throttler")


def config_from_env(env: Any) -> PolicyConfig:
    return PolicyConfig(
        outlier_intervals=env_int(env, "STOKER_THROTTLE_INTERVALS", 2),
        isolate_after=env_int(env, "STOKER_THROTTLE_ISOLATE_AFTER", 3),
        cooldown_s=env_float(env, "STOKER_THROTTLE_COOLDOWN_S", 30.0),
        isolation_s=env_float(env, "STOKER_THROTTLE_ISOLATION_S", 300.0),
        ranges=RangeConfig(
            cpu_floor=env_float(env, "STOKER_NORMAL_CPU_FLOOR", 300.0),
            cpu_ceiling=env_float(env, "STOKER_NORMAL_CPU_CEILING", 800.0),
            memory_floor=env_float(env, "STOKER_NORMAL_MEMORY_FLOOR", 128.0),
            memory_ceiling=env_float(env, "STOKER_NORMAL_MEMORY_CEILING", 512.0),
        ),
    )


def host_pressure_from_env(env: Any) -> bool:
    """``STOKER_THROTTLE_HOST_PRESSURE=on``: every node's pressure is this host's (``/proc``).

    Only for a node whose metrics carry no pressure of their own (an older agent) on an
    embedded platform, whose agents all run on the throttler's host;
    elsewhere such a node is judged by its saturation.
    """
    value = str(env.get("STOKER_THROTTLE_HOST_PRESSURE", "off")).strip().lower()
    if value not in ("on", "off"):
        raise ValueError(f"STOKER_THROTTLE_HOST_PRESSURE must be on or off, not {value!r}")
    return value == "on"


async def run(common: CommonSettings, config: PolicyConfig, host_pressure: bool = False) -> None:
    configure_logging(common)
    topics = common.topics
    provider = setup_tracing("throttler", common)
    broker = make_broker(common, "throttler", provider)
    reader = Reader(common.bootstrap, "throttler", dead_letters=dead_letters_to(broker, topics.dlq))
    functions = reader.table(topics.function, (FunctionSpec,))
    overrides = reader.table(topics.placement, (PlacementOverride,))
    # Heartbeats are each a trace of their own: a read span per beat would say nothing.
    nodes: Table[Any] = reader.table(topics.node, (NodeHeartbeat, NodeStopped, NodeObserved), traced=False)
    throttler = Throttler(config)

    async def apply(action: Action) -> None:
        log.warning("%s %s on %s/%s: %s", action.kind, action.function, action.node, action.instance, action.rule)
        if action.kind in ("clamp", "release-clamp") and action.node and action.incarnation:
            await broker.publish(
                Clamp(
                    incarnation=action.incarnation,
                    instance=action.instance,
                    # No instance: every instance of the function on the node, and those it starts.
                    function=action.function if action.instance is None else None,
                    cpu_millis=action.cpu_millis if action.kind == "clamp" else None,
                    reason=action.rule,
                ),
                topics.work(action.node),
                key=action.function.encode(),
            )
        elif action.kind == "kill" and action.node and action.incarnation:
            await broker.publish(
                Recycle(
                    incarnation=action.incarnation,
                    instance=action.instance,
                    force=True,
                    reason=f"killed by the throttler: {action.rule}",
                ),
                topics.work(action.node),
                key=action.function.encode(),
            )
        elif action.kind == "isolate":
            await broker.publish(
                PlacementOverride(
                    function=action.function, until_ms=action.until_ms, reason=action.rule, by="throttler"
                ),
                topics.placement,
                key=action.function.encode(),
            )
            # Old instances drain: idle ones go now, busy ones when their invocation ends.
            for node in nodes.rows.values():
                if isinstance(node, NodeHeartbeat) and node.labels.get("stoker.io/role") != "isolated":
                    await broker.publish(
                        Recycle(
                            incarnation=node.incarnation,
                            function=action.function,
                            busy_too=True,
                            reason=f"isolated: {action.rule}",
                        ),
                        topics.work(node.node),
                        key=action.function.encode(),
                    )
        elif action.kind == "release-isolation":
            await broker.publish(None, topics.placement, key=action.function.encode())
        await broker.publish(
            ThrottleDecided(
                function=action.function,
                action=action.kind,
                node=action.node,
                instance=action.instance,
                rule=action.rule,
                figures=action.figures,
            ),
            topics.throttle,
            key=action.function.encode(),
        )

    # Metrics are a stream of snapshots: one lost to a restart is replaced by the next interval.
    @broker.subscriber(
        topics.node_metric,
        group_id="stoker-throttler",
        auto_offset_reset="latest",
        ack_policy=AckPolicy.ACK,
        consumer_timeout_ms=FETCH_ROUTINE_TIMER_MS,
    )
    async def on_metrics(metrics: NodeMetrics) -> None:
        if now_ms() - metrics.at_ms > 10_000:
            return  # a backlog after a restart says nothing about now
        beat = nodes.rows.get(metrics.node)
        # The agent's own reading first: it ran on the node; this host's only for an embedded
        # platform whose (older) agents sent none.
        pressure: NodePressure | None = pressure_of(metrics)
        if pressure is None and host_pressure:
            pressure = read_host_pressure()
        capacity = (
            NodeCapacity(float(beat.capacity.cpu_millis), float(beat.capacity.memory_mb), pressure=pressure)
            if isinstance(beat, NodeHeartbeat)
            else NodeCapacity(pressure=pressure)
        )
        for action in throttler.observe(metrics, functions.rows, overrides.rows, now_ms(), capacity):
            await apply(action)

    async def tick() -> None:
        while True:
            await asyncio.sleep(1.0)
            now = now_ms()
            for action in throttler.releases(overrides.rows, now):
                await apply(action)
            throttler.forget(now)

    await serve("throttler", common, broker, on_start=[reader.start], background=[tick], on_stop=[reader.stop])
    provider.shutdown()


def main() -> None:
    asyncio.run(run(CommonSettings.from_env(), config_from_env(os.environ), host_pressure_from_env(os.environ)))
