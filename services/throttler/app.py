"""Composition root of the throttler: node metrics in; Clamp/Recycle commands, placement overrides
and ``throttle.decided`` events out. The decisions are :class:`services.throttler.policy.Throttler`'s,
their effects :class:`services.throttler.core.ThrottlerCore`'s."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from events import FunctionSpec, NodeHeartbeat, NodeStopped, PlacementOverride, Record, now_ms
from events.cluster import NodeObserved
from services.common.broker import make_broker
from services.common.runner import configure_logging, serve
from services.common.settings import CommonSettings, env_float, env_int
from services.common.telemetry import setup_tracing
from services.common.views import Reader, dead_letters_to
from services.throttler import handlers
from services.throttler.core import ThrottlerCore
from services.throttler.policy import PolicyConfig, Throttler
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

    async def publish(record: Record | None, topic: str, key: bytes) -> None:
        await broker.publish(record, topic, key=key)

    core = ThrottlerCore(
        topics,
        Throttler(config),
        publish,
        functions=reader.table(topics.function, (FunctionSpec,)),
        overrides=reader.table(topics.placement, (PlacementOverride,)),
        # Heartbeats are each a trace of their own: a read span per beat would say nothing.
        nodes=reader.table(topics.node, (NodeHeartbeat, NodeStopped, NodeObserved), traced=False),
        host_pressure=host_pressure,
    )
    handlers.subscribe(broker, topics, core)

    async def tick() -> None:
        while True:
            await asyncio.sleep(1.0)
            await core.tick(now_ms())

    await serve("throttler", common, broker, on_start=[reader.start], background=[tick], on_stop=[reader.stop])
    provider.shutdown()


def main() -> None:
    asyncio.run(run(CommonSettings.from_env(), config_from_env(os.environ), host_pressure_from_env(os.environ)))
