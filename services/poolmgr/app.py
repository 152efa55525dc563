"""Composition root of the pool manager: node heartbeats in, EnsurePool/Recycle commands out."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from events import EnsurePool, FunctionSpec, NodeHeartbeat, NodeStopped, Recycle, now_ms
from services.common.broker import make_broker
from services.common.runner import configure_logging, serve
from services.common.settings import CommonSettings, env_int
from services.common.table import CompactedTable
from services.common.telemetry import setup_tracing
from services.poolmgr.policy import PoolPolicy, generic_target, keepalive_expired

log = logging.getLogger("stoker.poolmgr")


async def run(common: CommonSettings, policy: PoolPolicy) -> None:
    configure_logging(common)
    provider = setup_tracing("poolmgr", common)
    broker = make_broker(common, "poolmgr", provider)
    functions: CompactedTable[FunctionSpec] = CompactedTable(common.bootstrap, common.topics.function, (FunctionSpec,))
    beats: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    nodes: CompactedTable[Any] = CompactedTable(
        common.bootstrap,
        common.topics.node,
        (NodeHeartbeat, NodeStopped),
        on_change=lambda name, rec: beats.put_nowait((name, rec)),
    )
    told: dict[str, tuple[str, int]] = {}  # node -> (incarnation, target) last commanded
    recycling: dict[str, int] = {}  # instance -> when the recycle was sent (avoid repeats)

    async def start_views() -> None:
        await functions.start()
        await nodes.start()

    async def on_heartbeat(name: str, hb: NodeHeartbeat) -> None:
        if now_ms() - hb.at_ms > 5_000:
            return  # a replayed heartbeat of a node long gone
        target = generic_target(hb, policy)
        if told.get(name) != (hb.incarnation, target) and hb.pool_target != target:
            await broker.publish(
                EnsurePool(incarnation=hb.incarnation, generic=target), common.topics.work(name), key=b"pool"
            )
        told[name] = (hb.incarnation, target)
        for decision in keepalive_expired(hb, functions.rows, policy):
            if now_ms() - recycling.get(decision.instance, 0) < 10_000:
                continue
            recycling[decision.instance] = now_ms()
            log.info("recycling %s on %s: %s", decision.instance, name, decision.reason)
            await broker.publish(
                Recycle(incarnation=hb.incarnation, instance=decision.instance, reason=decision.reason),
                common.topics.work(name),
                key=(decision.function or "").encode(),
            )

    async def follow_nodes() -> None:
        while True:
            name, record = await beats.get()
            if isinstance(record, NodeHeartbeat):
                await on_heartbeat(name, record)
            else:
                told.pop(name, None)

    async def stop_views() -> None:
        await functions.stop()
        await nodes.stop()

    await serve("poolmgr", common, broker, on_start=[start_views], background=[follow_nodes], on_stop=[stop_views])
    provider.shutdown()


def main() -> None:
    env = os.environ
    policy = PoolPolicy(
        generic_per_node=env_int(env, "STOKER_POOL_SIZE", 2),
    )
    asyncio.run(run(CommonSettings.from_env(), policy))
