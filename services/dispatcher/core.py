"""The dispatcher's state and actions around the pure routing and ledger modules.

Every accepted invocation is *handed on* by durable writes before its offset may be committed:
its Execute command on a node's work topic and then either its result or a ``dispatch.sent``
record, a ``dispatch.queued`` record while it waits for room, a forward to the workflow engine,
or its terminal result. The ``dispatch`` records (key = invocation id, on the invocation's own
partition number) are what the next owner of a partition rebuilds its queue and in-flight ledger
from after a crash or a rebalance; a tombstone there means the invocation ended.

Most invocations end within milliseconds, so an Execute is not recorded on ``dispatch`` at once:
only work still running after ``record_after_s`` is (:meth:`Dispatcher.record_overdue`), and
the offset of an unrecorded one waits for its result. What a crash leaves unrecorded lies after
the committed offset, where the next owner finds it: it re-reads those invocations and finds
their Executes by the ``stoker-source`` header in the tail of the work topics
(:mod:`services.dispatcher.recovery`). Two of the five writes an invocation cost are saved.

Handlers do not await the broker record by record: :meth:`Dispatcher.on_invocation` queues its
writes and returns their confirmations, which the intake awaits in batches.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from opentelemetry import trace

from events import (
    ErrorInfo,
    FunctionSpec,
    InstanceChanged,
    InvocationCompleted,
    InvocationRequested,
    NodeHeartbeat,
    NodeStopped,
    PlacementOverride,
    Record,
    Status,
    Timings,
    codec,
    now_ms,
)
from events.dispatch import DispatchState, InvocationQueued
from events.node import node_up
from events.work import SOURCE_HEADER, source_header
from services.common import placement, telemetry
from services.common.delivery import result_writes
from services.dispatcher.ledger import InFlight, Ledger, Waiting
from services.dispatcher.routing import NodeView, choose_node
from services.dispatcher.settings import DispatcherSettings

log = logging.getLogger("stoker.dispatcher")


class Send(Protocol):
    """Queue one write (a record, its encoded bytes, or a tombstone; topic, key, partition, extra
    headers); return its confirmation."""

    def __call__(
        self,
        record: Record | bytes | None,
        topic: str,
        key: str | None,
        partition: int | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Awaitable[asyncio.Future[Any]]: ...


FunctionLookup = Callable[[str], Awaitable[FunctionSpec | None]]


class DispatcherBroken(RuntimeError):
    """A write the delivery promise depends on failed: the process must stop and be restarted."""


class Dispatcher:
    """Routes invocations to nodes and keeps the promise of one terminal result each."""

    def __init__(
        self,
        settings: DispatcherSettings,
        send: Send,
        lookup: FunctionLookup,
        overrides: Callable[[str], PlacementOverride | None] = lambda _name: None,
        is_workflow: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self.settings = settings
        self.topics = settings.common.topics
        self.ledger = Ledger()
        self.nodes: dict[str, NodeView] = {}
        self.broken: BaseException | None = None
        """Set when a background write failed; the intake stops the process."""
        self._affinity: dict[tuple[str, str], str] = {}
        self._send = send
        self._lookup = lookup
        self._override = overrides
        self._is_workflow = is_workflow or _never
        self._started_ms = now_ms()
        self._specs: dict[str, tuple[FunctionSpec, bytes]] = {}
        self._unrecorded: OrderedDict[str, tuple[InFlight, asyncio.Future[None]]] = OrderedDict()
        """Dispatched work with no ``dispatch.sent`` record yet, oldest first, and the future its
        source offset waits for: resolved by its result, or once its record is confirmed."""

    # ----- invocations ------------------------------------------------------------------------

    async def on_invocation(
        self, inv: InvocationRequested, partition: int = 0, offset: int = 0
    ) -> list[asyncio.Future[Any]]:
        """Accept one invocation; returns the confirmations of the writes that hand it on."""
        span = trace.get_current_span()
        span.set_attribute(telemetry.INVOCATION_ID, inv.id)
        span.set_attribute(telemetry.FUNCTION, inv.function)
        if not self.ledger.first_sight(inv.id):
            log.info("duplicate invocation %s ignored", inv.id)
            return []
        spec = await self._lookup(inv.function)
        if spec is None:
            if await self._is_workflow(inv.function):
                # The workflow engine runs it; its steps come back here as invocations.
                return [await self._send(inv, self.topics.workflow_invocation, inv.function, None)]
            return await self._finish(
                inv, "rejected", ErrorInfo(kind="unknown_function", message=f"no function named {inv.function!r}")
            )
        if spec.source.digest is None:
            return await self._finish(
                inv,
                "rejected",
                ErrorInfo(kind="not_built", message=f"function {inv.function!r} has no built version yet"),
            )
        if inv.expired(now_ms()):
            return await self._finish(
                inv, "timeout", ErrorInfo(kind="deadline_passed", message="deadline passed before it was dispatched")
            )
        return await self._route(Waiting(inv, spec, since_ms=now_ms(), partition=partition, source_offset=offset))

    async def _route(self, item: Waiting, *, requeue_front: bool = False) -> list[asyncio.Future[Any]]:
        """Send ``item`` to a node, or queue it (durably, the first time)."""
        if not self.ledger.has_room(item.spec):
            return await self._wait(item, requeue_front)
        inv, spec = item.invocation, item.spec
        live = {name: view for name, view in self.nodes.items() if not self._stale(view)}
        selector, tolerations = placement.effective(spec, self._override(spec.name), now_ms())
        choice = choose_node(
            spec.name,
            spec.code_version,
            live,
            selector=selector,
            tolerations=tolerations,
            affinity=self._affinity.get((spec.name, spec.code_version)),
        )
        if choice is None:
            return await self._wait(item, requeue_front)  # retried on every tick until the deadline
        view = self.nodes[choice.node]
        incarnation = view.heartbeat.incarnation
        trace.get_current_span().set_attribute(telemetry.NODE, choice.node)
        entry = InFlight(
            inv, spec, choice.node, incarnation, item.attempt, now_ms(), item.partition, item.source_offset
        )
        self.ledger.add(entry)
        view.in_flight[spec.name] = view.in_flight.get(spec.name, 0) + 1
        self._affinity[(spec.name, spec.code_version)] = choice.node
        # The invocation and the spec are serialized once and spliced into both records.
        inv_raw = codec.encode(inv)
        cmd = codec.encode_with_parts(
            "work.execute",
            {"invocation": inv_raw, "spec": self._spec_bytes(spec)},
            incarnation=incarnation,
            attempt=item.attempt,
            dispatched_ms=entry.dispatched_ms,
        )
        execute = await self._send(
            cmd,
            self.topics.work(choice.node),
            inv.function,
            None,
            [(SOURCE_HEADER, source_header(item.partition, item.source_offset))],
        )
        if not item.recorded and item.attempt == 1 and self.settings.record_after_s > 0:
            # Fresh work: recorded only if it is still running after record_after_s.
            handed_on: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._unrecorded[inv.id] = (entry, handed_on)
            return [execute, handed_on]
        # Both writes are queued before either is sent, so on one broker they travel in one request.
        return [
            execute,
            await self._send(self._sent_record(entry, inv_raw), self.topics.dispatch, inv.id, item.partition),
        ]

    def _sent_record(self, entry: InFlight, inv_raw: bytes | None = None) -> bytes:
        return codec.encode_with_parts(
            "dispatch.sent",
            {"invocation": inv_raw if inv_raw is not None else codec.encode(entry.invocation)},
            source_offset=entry.source_offset,
            node=entry.node,
            incarnation=entry.incarnation,
            attempt=entry.attempt,
            dispatched_ms=entry.dispatched_ms,
        )

    async def record_overdue(self) -> None:
        """Record (``dispatch.sent``) the unrecorded work dispatched more than ``record_after_s`` ago."""
        limit = now_ms() - int(self.settings.record_after_s * 1000)
        while self._unrecorded:
            ident, (entry, _) = next(iter(self._unrecorded.items()))
            if entry.dispatched_ms > limit:
                return
            await self._record(ident)

    async def record_now(self, partitions: Iterable[int] | None = None) -> list[asyncio.Future[Any]]:
        """Record every unrecorded entry (of ``partitions``) at once: before a partition is handed over."""
        wanted = None if partitions is None else set(partitions)
        idents = [i for i, (e, _) in self._unrecorded.items() if wanted is None or e.partition in wanted]
        return [await self._record(ident) for ident in idents]

    async def _record(self, ident: str) -> asyncio.Future[Any]:
        entry, handed_on = self._unrecorded.pop(ident)
        write = await self._send(self._sent_record(entry), self.topics.dispatch, ident, entry.partition)
        self._hand_on_when(handed_on, [write])
        return write

    def _hand_on_when(self, handed_on: asyncio.Future[None], writes: list[asyncio.Future[Any]]) -> None:
        """Resolve ``handed_on`` once ``writes`` are confirmed (a failure stops the process)."""
        if not writes:
            if not handed_on.done():
                handed_on.set_result(None)
            return
        confirmation = asyncio.gather(*writes)

        def done(fut: asyncio.Future[Any]) -> None:
            if handed_on.done():
                return
            if fut.cancelled():
                handed_on.cancel()
            elif fut.exception() is not None:
                handed_on.set_exception(fut.exception())  # type: ignore[arg-type]
            else:
                handed_on.set_result(None)

        confirmation.add_done_callback(done)
        self._background(writes)

    def _spec_bytes(self, spec: FunctionSpec) -> bytes:
        cached = self._specs.get(spec.name)
        if cached is None or cached[0] is not spec:
            cached = (spec, codec.encode(spec))
            self._specs[spec.name] = cached
        return cached[1]

    async def _wait(self, item: Waiting, front: bool) -> list[asyncio.Future[Any]]:
        # An item taken from the head of its queue goes back to the head: arrival order holds.
        (self.ledger.wait_front if front else self.ledger.wait)(item)
        if item.recorded:
            return []
        item.recorded = True
        queued = InvocationQueued(
            invocation=item.invocation, source_offset=item.source_offset, since_ms=item.since_ms, attempt=item.attempt
        )
        return [await self._send(queued, self.topics.dispatch, item.invocation.id, item.partition)]

    # ----- results ----------------------------------------------------------------------------

    def wants_result(self, invocation_id: str) -> bool:
        """Whether a result with this id concerns this dispatcher (cheap: read before decoding)."""
        return invocation_id in self.ledger.in_flight

    async def on_result(self, result: InvocationCompleted) -> None:
        entry = self._forget(result.id)
        if entry is None:
            return
        unrecorded = self._unrecorded.pop(result.id, None)
        if unrecorded is not None:
            self._hand_on_when(unrecorded[1], [])  # its result is its hand-off: nothing to clear
        else:
            self._background([await self._send(None, self.topics.dispatch, result.id, entry.partition)])
        await self._drain(result.function)

    def _forget(self, invocation_id: str) -> InFlight | None:
        entry = self.ledger.complete(invocation_id)
        if entry is not None:
            view = self.nodes.get(entry.node)
            if view is not None and view.in_flight.get(entry.invocation.function):
                view.in_flight[entry.invocation.function] -= 1
        return entry

    async def _drain(self, function: str) -> None:
        while True:
            queue = self.ledger.waiting.get(function)
            if not queue or not self.ledger.has_room(queue[0].spec):
                return
            item = self.ledger.next_waiting(function)
            assert item is not None
            before = self.ledger.running(function)
            self._background(await self._route(item, requeue_front=True))
            if self.ledger.running(function) == before:
                return  # it went back to waiting (no eligible node): stop here

    async def _finish(
        self,
        inv: InvocationRequested,
        status: Status,
        error: ErrorInfo,
        *,
        recorded_on: int | None = None,
        **extra: Any,
    ) -> list[asyncio.Future[Any]]:
        """Write the terminal result (and clear its ``dispatch`` record, if it has one)."""
        result = InvocationCompleted(
            id=inv.id,
            function=inv.function,
            status=status,
            error=error,  # type: ignore[arg-type]
            timings_ms=Timings(total=float(max(0, now_ms() - inv.requested_ms))),
            principal=inv.principal,
            **extra,
        )
        delivery = result_writes(result, self.topics.result, inv.reply_to)
        writes = [await self._send(w.record, w.topic, w.key, None) for w in delivery]
        if recorded_on is not None:
            writes.append(await self._send(None, self.topics.dispatch, inv.id, recorded_on))
        return writes

    def _background(self, writes: Iterable[asyncio.Future[Any]]) -> None:
        """Writes no offset waits for (a retry, a drained queue, a tombstone): failures stop the process."""
        for write in writes:
            write.add_done_callback(self._check_write)

    def _check_write(self, write: asyncio.Future[Any]) -> None:
        if write.cancelled():
            return
        exc = write.exception()
        if exc is not None and self.broken is None:
            log.error("a write the delivery promise depends on failed: %r", exc)
            self.broken = exc

    # ----- recovery ---------------------------------------------------------------------------

    async def recover(
        self,
        partition: int,
        states: Iterable[DispatchState],
        ended: set[str],
        unrecorded: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        """Take over a partition: its queued and in-flight invocations, as the ``dispatch`` topic has them.

        ``ended`` holds the ids with a terminal result already on ``result`` (their record is
        cleared). ``unrecorded`` are the ids found only by their Execute in a work topic: they
        are recorded by the next :meth:`record_now`. Every id recovered here counts as seen, so a
        re-read of its invocation is skipped.
        """
        queued: list[InvocationQueued] = []
        for state in states:
            inv = state.invocation
            self.ledger.first_sight(inv.id)
            if inv.id in ended:
                if inv.id not in unrecorded:
                    self._background([await self._send(None, self.topics.dispatch, inv.id, partition)])
                continue
            if isinstance(state, InvocationQueued):
                queued.append(state)
                continue
            spec = await self._lookup(inv.function)
            entry = InFlight(
                inv,
                spec,
                state.node,
                state.incarnation,
                state.attempt,
                state.dispatched_ms,
                partition,
                state.source_offset,
            )
            self.ledger.add(entry)
            if inv.id in unrecorded:
                self._unrecorded[inv.id] = (entry, asyncio.get_running_loop().create_future())
            view = self.nodes.get(state.node)
            if view is not None:
                view.in_flight[inv.function] = view.in_flight.get(inv.function, 0) + 1
        for state in sorted(queued, key=lambda s: s.source_offset):
            spec = await self._lookup(state.invocation.function)
            if spec is None:
                self._background(
                    await self._finish(
                        state.invocation,
                        "rejected",
                        ErrorInfo(kind="unknown_function", message=f"{state.invocation.function!r} was deleted"),
                        recorded_on=partition,
                    )
                )
                continue
            item = Waiting(
                state.invocation, spec, state.since_ms, state.attempt, partition, state.source_offset, recorded=True
            )
            self.ledger.wait(item)
        log.info(
            "partition %d recovered: %d in flight, %d queued, %d already ended",
            partition,
            sum(1 for e in self.ledger.in_flight.values() if e.partition == partition),
            len(queued),
            len(ended),
        )
        for function in list(self.ledger.waiting):
            await self._drain(function)

    def release(self, partition: int) -> None:
        """A rebalance took ``partition`` away: forget its entries (the next owner recovers them)."""
        gone, dropped = self.ledger.drop_partition(partition)
        for entry in gone:
            unrecorded = self._unrecorded.pop(entry.invocation.id, None)
            if unrecorded is not None:
                unrecorded[1].cancel()  # never committed here: the next owner finds its Execute
            view = self.nodes.get(entry.node)
            if view is not None and view.in_flight.get(entry.invocation.function):
                view.in_flight[entry.invocation.function] -= 1
        log.info("partition %d released: %d in flight, %d queued handed over", partition, len(gone), len(dropped))

    # ----- nodes ------------------------------------------------------------------------------

    async def on_node(self, name: str, record: Any) -> None:
        if record is not None and not isinstance(record, (NodeHeartbeat, NodeStopped)):
            return  # what Kubernetes says of a node (node.observed): its agent's heartbeat is what counts
        if isinstance(record, NodeHeartbeat):
            view = self.nodes.get(name)
            if view is not None and view.heartbeat.incarnation != record.incarnation:
                # Learn the new incarnation first: retries must be addressed to it, not the dead one.
                view.beat(record)
                await self._node_lost(name, f"node {name} restarted", keep_incarnation=record.incarnation)
            if view is None:
                view = NodeView(record, record.at_ms)
                # Carry over this dispatcher's own counts if the node comes back.
                for entry in self.ledger.on_node(name):
                    view.in_flight[entry.invocation.function] = view.in_flight.get(entry.invocation.function, 0) + 1
                self.nodes[name] = view
                # Work recovered for an older incarnation of this node died with it.
                await self._node_lost(name, f"node {name} restarted", keep_incarnation=record.incarnation)
            view.beat(record)
            if not self._stale(view):
                for function in list(self.ledger.waiting):
                    await self._drain(function)
        else:
            await self._node_lost(name, f"node {name} stopped")

    def _why_waiting(self, spec: FunctionSpec, now: int) -> ErrorInfo:
        """Why an invocation waited until its deadline: no eligible node, or no capacity."""
        if not self.ledger.has_room(spec):
            return ErrorInfo(kind="no_capacity", message=f"{spec.name} was at its concurrency of {spec.concurrency}")
        selector, tolerations = placement.effective(spec, self._override(spec.name), now)
        live = [v.heartbeat for v in self.nodes.values() if not self._stale(v)]
        if not any(placement.eligible(node, selector, tolerations) for node in live):
            reasons = "; ".join(placement.why_not(node, selector, tolerations) for node in live) or "no live node"
            return ErrorInfo(kind="no_eligible_node", message=f"no node may run {spec.name}: {reasons}")
        return ErrorInfo(kind="no_capacity", message="no eligible node had capacity before the deadline")

    def on_instance(self, event: InstanceChanged) -> None:
        """A lifecycle event: routing sees a just-prewarmed instance before the next heartbeat."""
        view = self.nodes.get(event.node)
        if view is not None:
            view.saw(event)

    def _stale(self, view: NodeView) -> bool:
        timeout_ms = int(self.settings.node_timeout_s * 1000)
        return not node_up(view.last_seen_ms, now_ms(), view.heartbeat.interval_ms, timeout_ms)

    async def _node_lost(self, name: str, reason: str, keep_incarnation: str | None = None) -> None:
        if keep_incarnation is None:
            self.nodes.pop(name, None)
        lost = self.ledger.on_node(name, except_incarnation=keep_incarnation)
        for entry in lost:
            self._forget(entry.invocation.id)
            unrecorded = self._unrecorded.pop(entry.invocation.id, None)
            inv = entry.invocation
            spec = await self._lookup(inv.function)
            if spec is not None and entry.attempt < self.settings.max_attempts and not inv.expired(now_ms()):
                log.warning("%s: retrying invocation %s elsewhere", reason, inv.id)
                retry = Waiting(
                    inv,
                    spec,
                    since_ms=now_ms(),
                    attempt=entry.attempt + 1,
                    partition=entry.partition,
                    source_offset=entry.source_offset,
                )
                writes = await self._route(retry)  # a retry is recorded at once
            else:
                log.warning("%s: invocation %s lost", reason, inv.id)
                writes = await self._finish(
                    inv,
                    "lost",
                    ErrorInfo(kind="node_lost", message=f"{reason} while running it (attempt {entry.attempt})"),
                    recorded_on=None if unrecorded is not None else entry.partition,
                    node=name,
                    attempt=entry.attempt,
                )
            if unrecorded is not None:
                self._hand_on_when(unrecorded[1], writes)  # its offset waits for the retry's record or the result
            else:
                self._background(writes)

    @property
    def idle(self) -> bool:
        """Nothing waits and nothing is in flight: periodic duties can pause."""
        return self.ledger.is_empty()

    async def tick(self) -> None:
        """Periodic duties: record long-running work, declare silent nodes down, expire what waited too long."""
        await self.record_overdue()
        for name, view in list(self.nodes.items()):
            if self._stale(view):
                log.warning("node %s missed its heartbeats", name)
                await self._node_lost(name, f"node {name} missed its heartbeats")
        now = now_ms()
        if now - self._started_ms > self.settings.node_timeout_s * 1000:
            # Recovered work on a node that has not been heard of since this dispatcher started.
            for orphan in {e.node for e in self.ledger.in_flight.values() if e.node not in self.nodes}:
                await self._node_lost(orphan, f"node {orphan} is gone")
        for item in list(self.ledger.expired_waiting(now, int(self.settings.max_queue_s * 1000))):
            self._background(
                await self._finish(
                    item.invocation,
                    "rejected",
                    self._why_waiting(item.spec, now),
                    recorded_on=item.partition if item.recorded else None,
                )
            )
        for function in list(self.ledger.waiting):
            await self._drain(function)


async def _never(_name: str) -> bool:
    return False
