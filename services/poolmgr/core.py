"""The pool manager's state and actions for one term as the active copy, around the pure policies.

Everything it does is a write through ``write(outs, acks)`` (in the platform: the active copy's
:class:`~services.common.leadership.FencedWriter`, one Kafka transaction per call), and everything
it knows comes from views it is given (functions, nodes, placement overrides) and from the
records it is handed. A new term gets a new :class:`PoolManager`: its state is rebuilt from Kafka.

Prewarm requests are handled in the order of the prewarm topic, and the topic itself is the
prewarm's durable state:

1. ``prewarm.requested`` -> the Specialize commands, a ``prewarm.started`` record (on the same
   topic, after the request) and the request's offset, in one transaction;
2. ``prewarm.started`` -> wait until enough instances hold the code (or the timeout), then the
   function's activation (if asked) and ``prewarm.completed`` with the started record's offset,
   in one transaction.

A pool manager that takes over reads on from the committed offset: a request whose commands
were sent is past it, so it finds the ``prewarm.started`` record and waits for the same instances
instead of sending the commands again; a prewarm that ended is past it entirely.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal, Protocol, TypeVar

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
    PrewarmStarted,
    Recycle,
    Specialize,
    Topics,
    now_ms,
)
from services.common import placement
from services.common.broker import dead_letter_for
from services.common.leadership import Ack, Consumed, Out
from services.poolmgr import prewarm
from services.poolmgr.keepalive import KeepAliveDecision
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
Write = Callable[[Sequence[Out], Sequence[Ack]], Awaitable[None]]
"""Write records and commit consumed positions together (one transaction)."""

R_co = TypeVar("R_co", covariant=True)


class View(Protocol[R_co]):
    """What the pool manager needs of a view of a compacted topic."""

    @property
    def rows(self) -> dict[str, Any]: ...

    def get(self, key: str) -> R_co | None: ...

    async def wait_caught_up(self, timeout_s: float = ...) -> bool: ...


RECYCLE_REPEAT_MS = 10_000
"""A recycle of one instance is not sent again within this (its heartbeat may still list it)."""
JUST_ACTIVATED_MS = 30_000
"""A freshly activated version is protected from recycling until the view surely shows it."""


class PoolManager:
    """Node pools, keep-alive and prewarms, decided by the pure policies and written via ``write``."""

    def __init__(
        self,
        topics: Topics,
        policy: PoolPolicy,
        write: Write,
        *,
        functions: View[FunctionSpec],
        nodes: View[Any],
        overrides: View[PlacementOverride],
        arrivals: ArrivalBook,
        prewarm_timeout_s: float = 20.0,
    ) -> None:
        self.topics = topics
        self.policy = policy
        self.prewarm_timeout_s = prewarm_timeout_s
        self.arrivals = arrivals
        self._write = write
        self._functions = functions
        self._nodes = nodes
        self._overrides = overrides
        self.told: dict[str, tuple[str, int]] = {}
        """node -> (incarnation, generic target) last commanded."""
        self.recycling: dict[str, int] = {}
        """instance -> when its recycle was sent."""
        self.pending: dict[tuple[int, int], prewarm.PendingPrewarm] = {}
        """Prewarms being waited for, by the (partition, offset) of their request."""
        self.just_activated: dict[tuple[str, str], int] = {}
        """(function, version) -> protected from recycling until (epoch ms)."""
        self.prewarm_requested: dict[str, int] = {}
        """function -> window of its last keep-alive prewarm request."""
        self._wake = asyncio.Event()

    # ----- recovery -----------------------------------------------------------------------------

    def restore(self, records: Iterable[Any]) -> None:
        """Learn the keep-alive prewarms already requested from the prewarm topic's records."""
        for record in records:
            if isinstance(record, PrewarmRequested) and record.keepalive_window_ms is not None:
                known = self.prewarm_requested.get(record.function, record.keepalive_window_ms)
                self.prewarm_requested[record.function] = max(known, record.keepalive_window_ms)

    async def start(self) -> None:
        """Bring every live node's pool in line, as the nodes are now."""
        for name, record in list(self._nodes.rows.items()):
            await self.on_node(name, record)

    # ----- nodes --------------------------------------------------------------------------------

    def live_nodes(self) -> list[NodeHeartbeat]:
        now = now_ms()
        return [n for n in self._nodes.rows.values() if isinstance(n, NodeHeartbeat) and n.fresh(now)]

    async def on_node(self, name: str, record: Any) -> None:
        if isinstance(record, NodeHeartbeat):
            await self.on_heartbeat(name, record)
        elif record is None or isinstance(record, NodeStopped):
            self.told.pop(name, None)

    async def on_heartbeat(self, name: str, hb: NodeHeartbeat) -> None:
        if not hb.fresh(now_ms()):
            return  # a replayed heartbeat of a node long gone
        self._note_holders(hb)
        outs: list[Out] = []
        target = generic_target(hb, self.policy)
        if self.told.get(name) != (hb.incarnation, target) and hb.pool_target != target:
            outs.append(Out(self.topics.work(name), EnsurePool(incarnation=hb.incarnation, generic=target), "pool"))
        self.told[name] = (hb.incarnation, target)
        now = now_ms()
        for pair, until in list(self.just_activated.items()):
            if until < now:
                del self.just_activated[pair]
        protected = {(e.target.name, e.version) for e in self.pending.values()} | self.just_activated.keys()
        rows = self._functions.rows
        for decision in keepalive_decisions(hb, rows, self.policy, self.arrivals.functions, protected, now):
            if now - self.recycling.get(decision.instance, 0) < RECYCLE_REPEAT_MS:
                continue
            self.recycling[decision.instance] = now
            log.info("recycling %s on %s: %s", decision.instance, name, decision.reason)
            recycle = Recycle(incarnation=hb.incarnation, instance=decision.instance, reason=decision.reason)
            outs.append(Out(self.topics.work(name), recycle, decision.function or ""))
        await self._write(outs, ())

    def _note_holders(self, hb: NodeHeartbeat) -> None:
        """Instances a heartbeat shows holding a pending prewarm's version count as ready (events may be missed)."""
        changed = False
        for entry in self.pending.values():
            held = prewarm.holders([hb], entry.target.name, entry.version)
            if not held <= entry.ready:
                entry.ready |= held
                changed = True
        if changed:
            self._wake.set()

    def on_instance(self, event: InstanceChanged) -> None:
        if event.function is None or event.function_version is None:
            return
        changed = False
        for entry in self.pending.values():
            if (entry.target.name, entry.version) != (event.function, event.function_version):
                continue
            if event.state == "ready":
                entry.ready.add(event.instance)
                changed = True
            elif event.state == "gone" and event.reason.startswith("code failed to load"):
                entry.failure = event.reason
                changed = True
        if changed:
            self._wake.set()

    # ----- keep-alive ---------------------------------------------------------------------------

    async def keepalive_tick(self) -> None:
        now = now_ms()
        for instance, sent in list(self.recycling.items()):
            if now - sent > 60_000:
                del self.recycling[instance]
        rows = self._functions.rows
        gone = [name for name in self.arrivals.functions if name not in rows]
        self.arrivals.forget(gone)
        for name in gone:
            self.prewarm_requested.pop(name, None)
        live = self.live_nodes()
        if not live:
            return  # nowhere to load anything: keep the window for when a node comes
        loaded = loaded_functions(live, rows) | {e.target.name for e in self.pending.values()}
        due = keepalive_prewarms(rows, self.arrivals.functions, self.policy, loaded, self.prewarm_requested, now)
        outs = []
        for decision in due:
            self.prewarm_requested[decision.function] = decision.window
            log.info("pre-warming %s: %s", decision.function, decision.reason)
            request = PrewarmRequested(
                function=decision.function,
                count=1,
                activate=False,
                reason=decision.reason,
                keepalive_window_ms=decision.window,
            )
            outs.append(Out(self.topics.prewarm, request, decision.function))
        await self._write(outs, ())

    # ----- prewarms -----------------------------------------------------------------------------

    async def on_prewarm(self, item: Consumed) -> None:
        """One record of the prewarm topic, in the topic's order."""
        record = item.record
        if record is None:
            letter = dead_letter_for(
                topic=item.topic,
                partition=item.partition,
                offset=item.offset,
                key=item.key,
                value=item.value,
                reason=item.reason,
                consumer="poolmgr",
            )
            log.warning("dead-lettering %s[%s]@%s: %s", item.topic, item.partition, item.offset, item.reason)
            await self._write([Out(self.topics.dlq, letter, letter.key)], [item.ack])
        elif isinstance(record, PrewarmRequested):
            await self._start_prewarm(record, item)
        elif isinstance(record, PrewarmStarted):
            await self._await_prewarm(record, item)
        # prewarm.completed: our own reports share the topic; committed with the next write

    async def _start_prewarm(self, request: PrewarmRequested, item: Consumed) -> None:
        await self._functions.wait_caught_up(timeout_s=2.0)
        current = self._functions.get(request.function)
        if current is None:
            await self._write([self._completed(request, "failed", reason="no such function")], [item.ack])
            return
        if prewarm.superseded(current, request):
            await self._write(
                [self._completed(request, "superseded", reason="a later push is already active")], [item.ack]
            )
            return
        target = prewarm.target_spec(current, request)
        live = self.live_nodes()
        held = prewarm.holders(live, target.name, target.code_version)
        incarnations = {hb.node: hb.incarnation for hb in live}
        selector, tolerations = placement.effective(target, self._overrides.get(target.name), now_ms())
        plan = prewarm.spread(live, request.count - len(held), selector, tolerations)
        started = PrewarmStarted(
            function=target.name,
            request=request,
            target=target,
            wanted=request.count,
            holders=sorted(held),
            specialize=plan,
            source_partition=item.partition,
            source_offset=item.offset,
        )
        # Waited for from now on, so no instance event is missed while the commands are written.
        self.pending[(item.partition, item.offset)] = self._entry(started, held)
        outs = [
            Out(self.topics.work(node), Specialize(spec=target, incarnation=incarnations[node], count=n), target.name)
            for node, n in plan.items()
        ]
        outs.append(Out(self.topics.prewarm, started, target.name))
        try:
            await self._write(outs, [item.ack])
        except BaseException:
            self.pending.pop((item.partition, item.offset), None)
            raise

    def _entry(self, started: PrewarmStarted, held: Iterable[str]) -> prewarm.PendingPrewarm:
        return prewarm.PendingPrewarm(
            started.request, started.target, wanted=started.wanted, started_ms=started.at_ms, ready=set(held)
        )

    async def _await_prewarm(self, started: PrewarmStarted, item: Consumed) -> None:
        key = (started.source_partition, started.source_offset)
        entry = self.pending.get(key)
        if entry is None:
            # Started by an earlier term: wait for the same instances, as the nodes show them now.
            held = prewarm.holders(self.live_nodes(), started.target.name, started.target.code_version)
            entry = self._entry(started, held)
            self.pending[key] = entry
            log.info(
                "resuming the prewarm of %s@%s (%d of %d ready)",
                started.target.name,
                started.target.code_version,
                len(entry.ready),
                entry.wanted,
            )
        deadline_ms = entry.started_ms + int(self.prewarm_timeout_s * 1000)
        while not entry.done:
            remaining = (deadline_ms - now_ms()) / 1000
            if remaining <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), min(remaining, 1.0))
            except TimeoutError:
                pass
        try:
            await self._finish_prewarm(started, entry, item)
        finally:
            self.pending.pop(key, None)
        if entry.failure is None:
            # Protected until this process's own view of the function topic shows the switch.
            self.just_activated[(entry.target.name, entry.version)] = now_ms() + JUST_ACTIVATED_MS

    async def _finish_prewarm(self, started: PrewarmStarted, entry: prewarm.PendingPrewarm, item: Consumed) -> None:
        request, target = started.request, started.target
        took = float(max(0, now_ms() - entry.started_ms))
        if entry.failure is not None:
            log.warning("prewarm of %s@%s failed: %s", target.name, target.code_version, entry.failure)
            done = self._completed(
                request, "failed", ready=len(entry.ready), wanted=entry.wanted, reason=entry.failure, duration_ms=took
            )
            await self._write([done], [item.ack])
            return
        status: PrewarmStatus = "ready" if len(entry.ready) >= entry.wanted else "timed_out"
        outs: list[Out] = []
        activated = False
        if request.activate:
            await self._functions.wait_caught_up(timeout_s=2.0)
            latest = self._functions.get(request.function)
            if latest is not None and not prewarm.superseded(latest, request):
                outs.append(Out(self.topics.function, prewarm.activated(latest, target), target.name))
                activated = True
            elif latest is not None:
                status = "superseded"
        if status == "ready":
            reason = ""
        elif status == "timed_out":
            reason = f"only {len(entry.ready)} of {entry.wanted} instances ready after {self.prewarm_timeout_s:g}s"
        else:
            reason = "a later push became active first"
        log.info(
            "prewarm of %s@%s: %s%s", target.name, target.code_version, status, " (activated)" if activated else ""
        )
        outs.append(
            self._completed(
                request,
                status,
                ready=len(entry.ready),
                wanted=entry.wanted,
                activated=activated,
                reason=reason,
                duration_ms=took,
            )
        )
        await self._write(outs, [item.ack])

    def _completed(self, request: PrewarmRequested, status: PrewarmStatus, **fields: Any) -> Out:
        done = PrewarmCompleted(
            function=request.function, digest=request.digest, commit=request.commit, status=status, **fields
        )
        return Out(self.topics.prewarm, done, request.function)


# ----- learning from results (every copy, active or not) ------------------------------------------


def learn(arrivals: ArrivalBook, functions: View[FunctionSpec], result: InvocationCompleted) -> None:
    """Feed one invocation result to the keep-alive policy; log when a function's window changes."""
    if result.function not in functions.rows:
        return  # an unknown function's rejection: nothing to keep alive
    before = arrivals.functions.get(result.function)
    old = before.decision if before is not None else None
    if arrivals.record_result(result):
        new = arrivals.functions[result.function].decision
        if old is None or _changed(old, new):
            log.info("keep-alive of %s (%s): %s", result.function, arrivals.policy.name, _describe(new))


def _changed(old: KeepAliveDecision, new: KeepAliveDecision) -> bool:
    # The window, not the reason: a fallback's reason counts the idle times seen so far.
    return (old.prewarm_after_s, old.keep_alive_s) != (new.prewarm_after_s, new.keep_alive_s)


def _describe(decision: KeepAliveDecision) -> str:
    return (
        f"load {decision.prewarm_after_s:.0f}s to {decision.unload_after_s:.0f}s after each invocation"
        f" ({decision.reason})"
    )
