"""The dispatcher's state and actions around the pure routing and ledger modules."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry import trace

from events import (
    ErrorInfo,
    Execute,
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
    now_ms,
)
from services.common import placement, telemetry
from services.dispatcher.ledger import InFlight, Ledger, Waiting
from services.dispatcher.routing import NodeView, choose_node
from services.dispatcher.settings import DispatcherSettings

log = logging.getLogger("stoker.dispatcher")

Publish = Callable[[Record, str, str | None], Awaitable[Any]]
FunctionLookup = Callable[[str], Awaitable[FunctionSpec | None]]


class Dispatcher:
    """Routes invocations to nodes and keeps the promise of one terminal result each."""

    def __init__(
        self,
        settings: DispatcherSettings,
        publish: Publish,
        lookup: FunctionLookup,
        overrides: Callable[[str], PlacementOverride | None] = lambda _name: None,
        is_workflow: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self.settings = settings
        self.topics = settings.common.topics
        self.ledger = Ledger()
        self.nodes: dict[str, NodeView] = {}
        self._affinity: dict[tuple[str, str], str] = {}
        self._publish = publish
        self._lookup = lookup
        self._override = overrides
        self._is_workflow = is_workflow or _never

    # ----- invocations ------------------------------------------------------------------------

    async def on_invocation(self, inv: InvocationRequested) -> None:
        span = trace.get_current_span()
        span.set_attribute(telemetry.INVOCATION_ID, inv.id)
        span.set_attribute(telemetry.FUNCTION, inv.function)
        if not self.ledger.first_sight(inv.id):
            log.info("duplicate invocation %s ignored", inv.id)
            return
        spec = await self._lookup(inv.function)
        if spec is None:
            if await self._is_workflow(inv.function):
                return  # the workflow engine runs it; its steps come back here as invocations
            await self._finish(
                inv, "rejected", ErrorInfo(kind="unknown_function", message=f"no function named {inv.function!r}")
            )
            return
        if spec.source.digest is None:
            await self._finish(
                inv,
                "rejected",
                ErrorInfo(kind="not_built", message=f"function {inv.function!r} has no built version yet"),
            )
            return
        if inv.expired(now_ms()):
            await self._finish(
                inv, "timeout", ErrorInfo(kind="deadline_passed", message="deadline passed before it was dispatched")
            )
            return
        await self._route(Waiting(inv, spec, since_ms=now_ms()))

    async def _route(self, item: Waiting, *, requeue_front: bool = False) -> None:
        def wait() -> None:
            # An item taken from the head of its queue goes back to the head: arrival order holds.
            (self.ledger.wait_front if requeue_front else self.ledger.wait)(item)

        if not self.ledger.has_room(item.spec):
            wait()
            return
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
            wait()  # no eligible node now; retried on every tick until the deadline
            return
        view = self.nodes[choice.node]
        cmd = Execute(invocation=inv, spec=spec, incarnation=view.heartbeat.incarnation, attempt=item.attempt)
        trace.get_current_span().set_attribute(telemetry.NODE, choice.node)
        entry = InFlight(inv, spec, choice.node, view.heartbeat.incarnation, item.attempt, now_ms())
        self.ledger.add(entry)
        view.in_flight[spec.name] = view.in_flight.get(spec.name, 0) + 1
        self._affinity[(spec.name, spec.code_version)] = choice.node
        try:
            await self._publish(cmd, self.topics.work(choice.node), inv.function)
        except Exception:
            self._forget(inv.id)
            raise

    # ----- results ----------------------------------------------------------------------------

    async def on_result(self, result: InvocationCompleted) -> None:
        if self._forget(result.id) is None:
            return
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
            await self._route(item, requeue_front=True)
            if self.ledger.running(function) == before:
                return  # it went back to waiting (no eligible node): stop here

    async def _finish(self, inv: InvocationRequested, status: Status, error: ErrorInfo, **extra: Any) -> None:
        result = InvocationCompleted(
            id=inv.id,
            function=inv.function,
            status=status,
            error=error,  # type: ignore[arg-type]
            timings_ms=Timings(total=float(max(0, now_ms() - inv.requested_ms))),
            **extra,
        )
        writes = [self._publish(result, self.topics.result, inv.id)]
        if inv.reply_to:
            writes.append(self._publish(result, inv.reply_to, inv.id))
        for write in writes:
            await write

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
        return now_ms() - view.last_seen_ms > self.settings.node_timeout_s * 1000

    async def _node_lost(self, name: str, reason: str, keep_incarnation: str | None = None) -> None:
        if keep_incarnation is None:
            self.nodes.pop(name, None)
        lost = self.ledger.on_node(name, except_incarnation=keep_incarnation)
        for entry in lost:
            self._forget(entry.invocation.id)
            inv = entry.invocation
            if entry.attempt < self.settings.max_attempts and not inv.expired(now_ms()):
                log.warning("%s: retrying invocation %s elsewhere", reason, inv.id)
                await self._route(Waiting(inv, entry.spec, since_ms=now_ms(), attempt=entry.attempt + 1))
            else:
                log.warning("%s: invocation %s lost", reason, inv.id)
                await self._finish(
                    inv,
                    "lost",
                    ErrorInfo(kind="node_lost", message=f"{reason} while running it (attempt {entry.attempt})"),
                    node=name,
                    attempt=entry.attempt,
                )

    async def tick(self) -> None:
        """Periodic duties: declare silent nodes down, expire what waited too long."""
        for name, view in list(self.nodes.items()):
            if self._stale(view):
                log.warning("node %s missed its heartbeats", name)
                await self._node_lost(name, f"node {name} missed its heartbeats")
        now = now_ms()
        for item in list(self.ledger.expired_waiting(now, int(self.settings.max_queue_s * 1000))):
            await self._finish(item.invocation, "rejected", self._why_waiting(item.spec, now))
        for function in list(self.ledger.waiting):
            await self._drain(function)


async def _never(_name: str) -> bool:
    return False
