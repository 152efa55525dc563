"""Composition root of the pool manager.

Node heartbeats in, EnsurePool/Recycle commands out (pool size, keep-alive); prewarm requests in,
Specialize commands out, and the function's active version switched once the code is loaded.
Invocation results in (every one, from the end of the topic): each function's idle times, from
which the keep-alive policy decides when its instances are recycled and when one is pre-warmed
ahead of the next expected invocation (a PrewarmRequested on the prewarm topic, handled here too).
The decisions and their state are :class:`services.poolmgr.core.PoolManager`'s, what a term does
with what it reads :mod:`services.poolmgr.handlers`'.

Several copies may run (``stoker up --poolmgrs N``): one is active, the others stand by
(:mod:`services.common.leadership`). Every copy keeps its views current and learns from every
result, so a standby takes over with them; only the active copy writes, through a fenced
transactional writer, and a new active copy rebuilds the rest from Kafka.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from events import (
    FunctionSpec,
    InstanceChanged,
    InvocationCompleted,
    NodeHeartbeat,
    NodeStopped,
    PlacementOverride,
    PrewarmCompleted,
    PrewarmRequested,
    PrewarmStarted,
)
from events.cluster import NodeObserved
from services.common.broker import make_broker
from services.common.leadership import FencedWriter, Leadership, TermReader, run_loops
from services.common.runner import configure_logging, mark_ready, serve
from services.common.telemetry import setup_tracing
from services.common.views import Reader, Table, dead_letters_to
from services.poolmgr import handlers
from services.poolmgr.core import PoolManager, learn
from services.poolmgr.handlers import GROUP
from services.poolmgr.policy import ArrivalBook
from services.poolmgr.settings import PoolmgrSettings, pool_policy_from_env

__all__ = ["GROUP", "main", "pool_policy_from_env", "run"]

log = logging.getLogger("stoker.poolmgr")

PREWARM_RECORDS = (PrewarmRequested, PrewarmStarted, PrewarmCompleted)
RESULT_BATCH_BYTES = 256 * 1024
"""Results gathered at the broker before it answers the results reader (about a thousand)."""


async def run(settings: PoolmgrSettings) -> None:
    common = settings.common
    configure_logging(common)
    topics = common.topics
    provider = setup_tracing("poolmgr", common)
    broker = make_broker(common, "poolmgr", provider)
    arrivals = ArrivalBook(settings.policy.keepalive)
    relay = handlers.Relay()

    # ----- views: every copy keeps them current, so a standby takes over with them ready -----
    reader = Reader(common.bootstrap, "poolmgr", dead_letters=dead_letters_to(broker, topics.dlq))
    functions = reader.table(topics.function, (FunctionSpec,))
    overrides = reader.table(topics.placement, (PlacementOverride,))
    nodes: Table[Any] = reader.table(
        topics.node,
        (NodeHeartbeat, NodeStopped, NodeObserved),
        on_change=relay.node,
        traced=False,  # heartbeats: each its own trace, a read span per beat says nothing
    )
    reader.tail(topics.instance, (InstanceChanged,), relay.instance)
    # Every result of the platform, for the keep-alive policy, which thinks in minutes: a reader of
    # its own that the broker answers once a batch has gathered (or the idle wait ran out), so
    # hundreds of results a second cost a fetch or two, and never delay the views above.
    results = Reader(
        common.bootstrap,
        "poolmgr-results",
        dead_letters=dead_letters_to(broker, topics.dlq),
        fetch_min_bytes=RESULT_BATCH_BYTES,
    )
    # A span each would add to every invocation's trace.
    results.tail(topics.result, (InvocationCompleted,), lambda r: learn(arrivals, functions, r), traced=False)
    # ----- end of views ----------------------------------------------------------------------

    stopping = False
    facts: dict[str, object] = {"keepalive": settings.policy.keepalive.name, "instance": settings.instance_name}

    def on_role(role: str) -> None:
        if not stopping:
            mark_ready(common, settings.component, **facts, role=role)

    leadership = Leadership.for_service(
        common.bootstrap,
        topics,
        "poolmgr",
        instance=settings.instance_name,
        session_timeout_ms=settings.lease_timeout_ms,
        on_role=on_role,
    )

    async def lead(writer: FencedWriter) -> None:
        """One term as the active copy: ``writer`` has fenced the previous one."""
        began = time.monotonic()
        requests = TermReader(
            common.bootstrap, topics.prewarm, GROUP, PREWARM_RECORDS, client_id=f"stoker-{settings.instance_name}"
        )
        relay.nodes = asyncio.Queue()
        try:
            for view in (functions, nodes, overrides):
                await view.wait_caught_up(timeout_s=10.0)
            core = PoolManager(
                topics,
                settings.policy,
                writer.write,
                functions=functions,
                nodes=nodes,
                overrides=overrides,
                arrivals=arrivals,
                prewarm_timeout_s=settings.prewarm_timeout_s,
            )
            seen: list[Any] = []
            history = reader.tail(topics.prewarm, PREWARM_RECORDS, seen.append, replay=True, traced=False)
            history.on_bad_record = lambda *_: None  # the intake dead-letters them
            await history.start()
            await history.stop()
            core.restore(seen)
            relay.core = core
            await core.start()
            await requests.start()
            log.info(
                "acting %.2fs after the fence; %d keep-alive windows known",
                time.monotonic() - began,
                len(core.prewarm_requested),
            )

            loops = [
                handlers.follow_nodes(core, relay.nodes),
                handlers.keepalive(core, settings.keepalive_tick_s),
                handlers.intake(core, requests.batch),
            ]
            await run_loops(loops, writer.failed)
        finally:
            relay.core = None
            relay.nodes = None
            await requests.stop()

    async def lead_while_holding() -> None:
        await leadership.run(lead)

    async def stop() -> None:
        nonlocal stopping
        stopping = True
        await leadership.stop()
        await results.stop()
        await reader.stop()

    await serve(
        settings.component,
        common,
        broker,
        on_start=[reader.start, results.start, leadership.start],
        background=[lead_while_holding],
        on_stop=[stop],
        ready_facts={**facts, "role": "standby"},
    )
    provider.shutdown()


def main() -> None:
    asyncio.run(run(PoolmgrSettings.from_env()))
