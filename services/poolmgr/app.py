"""Composition root of the pool manager.

Node heartbeats in, EnsurePool/Recycle commands out (pool size, keep-alive); prewarm requests in,
Specialize commands out, and the function's active version switched once the code is loaded.
Invocation results in (every one, from the end of the topic): each function's idle times, from
which the keep-alive policy decides when its instances are recycled and when one is pre-warmed
ahead of the next expected invocation (a PrewarmRequested on the prewarm topic, handled here too).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any, Literal

from faststream.middlewares import AckPolicy

from events import (
    EnsurePool,
    FunctionSpec,
    InstanceChanged,
    InvocationCompleted,
    NodeHeartbeat,
    NodeStopped,
    PlacementOverride,
    PrewarmCompleted,
    PrewarmRequested,
    Recycle,
    Specialize,
    now_ms,
)
from events.cluster import NodeObserved
from services.common import placement
from services.common.broker import make_broker
from services.common.runner import configure_logging, serve
from services.common.settings import CommonSettings, env_float, env_int, env_str
from services.common.table import CompactedTable, TopicTail
from services.common.telemetry import setup_tracing
from services.poolmgr import prewarm
from services.poolmgr.keepalive import KeepAliveDecision, policy_from_config
from services.poolmgr.policy import (
    ArrivalBook,
    PoolPolicy,
    generic_target,
    keepalive_decisions,
    keepalive_prewarms,
    loaded_functions,
)

log = logging.getLogger("stoker.poolmgr")
PrewarmStatus = Literal["ready", "timed_out", "failed", "superseded"]


async def run(
    common: CommonSettings, policy: PoolPolicy, prewarm_timeout_s: float = 20.0, keepalive_tick_s: float = 1.0
) -> None:
    configure_logging(common)
    topics = common.topics
    provider = setup_tracing("poolmgr", common)
    broker = make_broker(common, "poolmgr", provider)
    functions: CompactedTable[FunctionSpec] = CompactedTable(common.bootstrap, topics.function, (FunctionSpec,))
    overrides: CompactedTable[PlacementOverride] = CompactedTable(
        common.bootstrap, topics.placement, (PlacementOverride,)
    )
    beats: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    nodes: CompactedTable[Any] = CompactedTable(
        common.bootstrap,
        topics.node,
        (NodeHeartbeat, NodeStopped, NodeObserved),
        on_change=lambda name, rec: beats.put_nowait((name, rec)),
    )
    told: dict[str, tuple[str, int]] = {}  # node -> (incarnation, target) last commanded
    recycling: dict[str, int] = {}  # instance -> when the recycle was sent (avoid repeats)
    pending: dict[tuple[str, str], prewarm.PendingPrewarm] = {}
    just_activated: dict[tuple[str, str], int] = {}  # (function, version) -> protected until (ms)
    changed = asyncio.Condition()
    arrivals = ArrivalBook(policy.keepalive)
    prewarm_requested: dict[str, int] = {}  # function -> window of its last keep-alive prewarm

    def live_nodes() -> list[NodeHeartbeat]:
        now = now_ms()
        return [n for n in nodes.rows.values() if isinstance(n, NodeHeartbeat) and n.fresh(now)]

    async def on_instance(event: InstanceChanged) -> None:
        if event.function is None or event.function_version is None:
            return
        entry = pending.get((event.function, event.function_version))
        if entry is None:
            return
        if event.state == "ready":
            entry.ready.add(event.instance)
        elif event.state == "gone" and event.reason.startswith("code failed to load"):
            entry.failure = event.reason
        async with changed:
            changed.notify_all()

    instances = TopicTail(common.bootstrap, topics.instance, (InstanceChanged,), on_instance)

    def on_result(result: InvocationCompleted) -> None:
        if result.function not in functions.rows:
            return  # an unknown function's rejection: nothing to keep alive
        before = arrivals.functions.get(result.function)
        old = before.decision if before is not None else None
        if arrivals.record_result(result):
            new = arrivals.functions[result.function].decision
            if old is None or _changed(old, new):
                log.info("keep-alive of %s (%s): %s", result.function, policy.keepalive.name, _describe(new))

    results = TopicTail(common.bootstrap, topics.result, (InvocationCompleted,), on_result)

    async def start_views() -> None:
        await instances.start()
        await functions.start()
        await results.start()
        await nodes.start()
        await overrides.start()

    async def on_heartbeat(name: str, hb: NodeHeartbeat) -> None:
        if now_ms() - hb.at_ms > 5_000:
            return  # a replayed heartbeat of a node long gone
        target = generic_target(hb, policy)
        if told.get(name) != (hb.incarnation, target) and hb.pool_target != target:
            await broker.publish(EnsurePool(incarnation=hb.incarnation, generic=target), topics.work(name), key=b"pool")
        told[name] = (hb.incarnation, target)
        now = now_ms()
        for pair, until in list(just_activated.items()):
            if until < now:
                del just_activated[pair]
        protected = pending.keys() | just_activated.keys()
        for decision in keepalive_decisions(hb, functions.rows, policy, arrivals.functions, protected, now):
            if now_ms() - recycling.get(decision.instance, 0) < 10_000:
                continue
            recycling[decision.instance] = now_ms()
            log.info("recycling %s on %s: %s", decision.instance, name, decision.reason)
            await broker.publish(
                Recycle(incarnation=hb.incarnation, instance=decision.instance, reason=decision.reason),
                topics.work(name),
                key=(decision.function or "").encode(),
            )

    async def follow_nodes() -> None:
        while True:
            name, record = await beats.get()
            if isinstance(record, NodeHeartbeat):
                await on_heartbeat(name, record)
            elif record is None or isinstance(record, NodeStopped):
                told.pop(name, None)

    async def keepalive_tick() -> None:
        while True:
            await asyncio.sleep(keepalive_tick_s)
            now = now_ms()
            for instance, sent in list(recycling.items()):
                if now - sent > 60_000:
                    del recycling[instance]
            gone = [name for name in arrivals.functions if name not in functions.rows]
            arrivals.forget(gone)
            for name in gone:
                prewarm_requested.pop(name, None)
            live = live_nodes()
            if not live:
                continue  # nowhere to load anything: keep the window for when a node comes
            loaded = loaded_functions(live, functions.rows) | {fn for fn, _ in pending}
            due = keepalive_prewarms(functions.rows, arrivals.functions, policy, loaded, prewarm_requested, now)
            for decision in due:
                prewarm_requested[decision.function] = decision.window
                log.info("pre-warming %s: %s", decision.function, decision.reason)
                await broker.publish(
                    PrewarmRequested(function=decision.function, count=1, activate=False, reason=decision.reason),
                    topics.prewarm,
                    key=decision.function.encode(),
                )

    async def finish(request: PrewarmRequested, status: PrewarmStatus, **fields: Any) -> None:
        await broker.publish(
            PrewarmCompleted(
                function=request.function, digest=request.digest, commit=request.commit, status=status, **fields
            ),
            topics.prewarm,
            key=request.function.encode(),
        )

    # The request is committed once its prewarm ended (ready, failed or timed out), so a pool
    # manager restarted mid-prewarm picks it up again instead of never activating the version.
    @broker.subscriber(
        topics.prewarm, group_id="stoker-poolmgr", auto_offset_reset="earliest", ack_policy=AckPolicy.NACK_ON_ERROR
    )
    async def on_prewarm(request: PrewarmRequested | PrewarmCompleted) -> None:
        if isinstance(request, PrewarmCompleted):
            return  # our own reports share the topic
        await functions.wait_caught_up(timeout_s=2.0)
        current = functions.get(request.function)
        if current is None:
            await finish(request, "failed", reason="no such function")
            return
        if prewarm.superseded(current, request):
            await finish(request, "superseded", reason="a later push is already active")
            return
        target = prewarm.target_spec(current, request)
        live = live_nodes()
        already = prewarm.holding(live, target.name, target.code_version)
        entry = prewarm.PendingPrewarm(request, target, wanted=request.count)
        key = (target.name, target.code_version)
        pending[key] = entry
        try:
            incarnations = {hb.node: hb.incarnation for hb in live}
            selector, tolerations = placement.effective(target, overrides.get(target.name), now_ms())
            for node, count in prewarm.spread(live, request.count - already, selector, tolerations).items():
                await broker.publish(
                    Specialize(spec=target, incarnation=incarnations[node], count=count),
                    topics.work(node),
                    key=target.name.encode(),
                )
            entry.ready.update(f"existing-{i}" for i in range(already))
            deadline = asyncio.get_running_loop().time() + prewarm_timeout_s
            async with changed:
                while not entry.done:
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        break
                    try:
                        await asyncio.wait_for(changed.wait(), remaining)
                    except TimeoutError:
                        break
        finally:
            if entry.failure is None:
                # Protected until this process's own view of the function topic shows the switch.
                just_activated[key] = now_ms() + 30_000
            pending.pop(key, None)
        took = float(now_ms() - entry.started_ms)
        if entry.failure is not None:
            log.warning("prewarm of %s@%s failed: %s", target.name, target.code_version, entry.failure)
            await finish(
                request, "failed", ready=len(entry.ready), wanted=entry.wanted, reason=entry.failure, duration_ms=took
            )
            return
        status: PrewarmStatus = "ready" if len(entry.ready) >= entry.wanted else "timed_out"
        activated = False
        if request.activate:
            await functions.wait_caught_up(timeout_s=2.0)
            latest = functions.get(request.function)
            if latest is not None and not prewarm.superseded(latest, request):
                await broker.publish(prewarm.activated(latest, target), topics.function, key=target.name.encode())
                activated = True
            elif latest is not None:
                status = "superseded"
        reason = (
            ""
            if status == "ready"
            else (
                f"only {len(entry.ready)} of {entry.wanted} instances ready after {prewarm_timeout_s:g}s"
                if status == "timed_out"
                else "a later push became active first"
            )
        )
        log.info(
            "prewarm of %s@%s: %s%s", target.name, target.code_version, status, " (activated)" if activated else ""
        )
        await finish(
            request,
            status,
            ready=len(entry.ready),
            wanted=entry.wanted,
            activated=activated,
            reason=reason,
            duration_ms=took,
        )

    async def stop_views() -> None:
        await overrides.stop()
        await functions.stop()
        await nodes.stop()
        await instances.stop()
        await results.stop()

    await serve(
        "poolmgr",
        common,
        broker,
        on_start=[start_views],
        background=[follow_nodes, keepalive_tick],
        on_stop=[stop_views],
        ready_facts={"keepalive": policy.keepalive.name},
    )
    provider.shutdown()


def _changed(old: KeepAliveDecision, new: KeepAliveDecision) -> bool:
    # The window, not the reason: a fallback's reason counts the idle times seen so far.
    return (old.prewarm_after_s, old.keep_alive_s) != (new.prewarm_after_s, new.keep_alive_s)


def _describe(decision: KeepAliveDecision) -> str:
    return (
        f"load {decision.prewarm_after_s:.0f}s to {decision.unload_after_s:.0f}s after each invocation"
        f" ({decision.reason})"
    )


def pool_policy_from_env(env: Mapping[str, str]) -> PoolPolicy:
    """The pool policy configured by ``STOKER_POOL_SIZE``, ``STOKER_KEEPALIVE`` and ``STOKER_KEEPALIVE_FIXED_S``.

    ``STOKER_KEEPALIVE``: ``hybrid`` (default, learned per function) or ``fixed`` (every function
    keeps its idle instances ``STOKER_KEEPALIVE_FIXED_S`` seconds, 600 by default). A function that
    sets ``idle_s`` keeps that fixed value either way.
    """
    keepalive = policy_from_config(
        env_str(env, "STOKER_KEEPALIVE", "hybrid"), env_float(env, "STOKER_KEEPALIVE_FIXED_S", 600.0)
    )
    return PoolPolicy(generic_per_node=env_int(env, "STOKER_POOL_SIZE", 2), keepalive=keepalive)


def main() -> None:
    env = os.environ
    policy = pool_policy_from_env(env)
    asyncio.run(run(CommonSettings.from_env(), policy, env_float(env, "STOKER_PREWARM_TIMEOUT_S", 20.0)))
