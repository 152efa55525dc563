"""The node agent's state and actions: instances, code cache, execution, heartbeats.

Handlers (``handlers.py``) turn work commands into calls here; the decisions themselves
(which instance, how many to start, what to recycle) are the pure functions of ``pool.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status as SpanStatus
from opentelemetry.trace import StatusCode

from events import (
    Clamp,
    ConfigureNode,
    EnsurePool,
    ErrorInfo,
    Execute,
    FunctionSpec,
    InstanceChanged,
    InstanceMetrics,
    InstanceSummary,
    InvocationCompleted,
    NodeCapacity,
    NodeHeartbeat,
    NodeMetrics,
    NodeStopped,
    Record,
    Recycle,
    Specialize,
    StartKind,
    Status,
    Timings,
    now_ms,
)
from events.instance import InstanceState
from events.metrics import NodeCpuPressure
from services.agent import pool
from services.agent.cgroups import CgroupError, HostPressure, read_host_pressure
from services.agent.instances import Instance, InstanceDied, InstanceTimeout, NotStarted
from services.agent.launcher import Launcher
from services.agent.sandbox import SandboxError
from services.agent.settings import AgentSettings
from services.common import placement, telemetry
from services.common.artifacts import ArtifactError, ArtifactStore, unpack_verified
from services.common.delivery import result_writes

log = logging.getLogger("stoker.agent")
tracer = trace.get_tracer("stoker.agent")

Publish = Callable[[Record, str, str | None], Awaitable[Any]]
"""Publish a record to a topic with a key, returning once the broker confirmed it."""
PublishResult = Callable[[Record, Sequence[str], str], Awaitable[None]]
"""Publish a result to each of the topics with a key, returning once the broker confirmed every copy."""
STARTED_PER_INSTANCE = 16
"""Invocations started (waiting for an instance or running) per instance the node may have; the
rest of a backlog waits as plain commands, in arrival order."""
WAIT_RECHECK_S = 5.0
"""An invocation waiting for an instance plans again at least this often. Every change that can
end a wait (an instance released, prewarmed, reset, started or gone) wakes waiters at once: with
thousands queued, planning each one every second cost more than running them."""


@dataclass
class _Slot:
    instance: Instance
    prewarmed: bool = False
    prewarm_trace: trace.SpanContext | None = None
    """The span that specialized this instance ahead of demand: the build trace it belongs to."""
    spec: FunctionSpec | None = None
    """The function loaded in it (placement rules apply to it: a NoExecute taint drains it)."""
    retire_after_use: str | None = None
    """Set when the instance must go once its invocation ends (drain), with the reason."""
    kill_reason: str | None = None
    """Why the platform killed this instance on purpose (reported instead of ``instance_died``)."""
    clamped_millis: int | None = None
    """A CPU quota the throttler imposed, below the function's own."""
    last_cpu_ns: int | None = None
    last_throttled_ns: int | None = None
    last_wait_ns: int | None = None
    last_nr_throttled: int | None = None
    runner: object | None = None
    """The invocation the instance is running (its ``_Outcome``): only it decides what happens to
    the instance afterwards, unless an invocation queued behind it has begun (then that one does)."""
    runner_keeps: bool = False
    """The running invocation's spec leaves the instance as it is (reuse keep, no max invocations
    or age): only then may another invocation be queued behind it."""
    queued: bool = False
    """An invocation is queued behind the running one (at most one)."""


def _keeps(spec: FunctionSpec) -> bool:
    """Whether an invocation of ``spec`` leaves its instance as it found it, so the next one may be
    queued behind it on the instance."""
    return spec.reuse == "keep" and spec.max_invocations is None and spec.max_age_s is None


class _Requeue(Exception):
    """The instance an invocation was queued on went before it began: plan it again."""


class NodeAgent:
    """Everything one node agent holds and does."""

    def __init__(
        self, settings: AgentSettings, publish: Publish, store: ArtifactStore, publish_result: PublishResult
    ) -> None:
        self.settings = settings
        self._launcher = Launcher(settings)
        self.topics = settings.common.topics
        self.incarnation = uuid.uuid4().hex[:12]
        self.pool_target = settings.pool_size
        self.labels = dict(settings.labels)
        self.taints = list(settings.taints)
        self.unschedulable = False
        self._publish = publish
        self._publish_result = publish_result
        self._store = store
        self._slots: dict[str, _Slot] = {}
        self._starting = 0
        self._waiting: dict[tuple[str | None, str | None], deque[asyncio.Future[_Slot | None]]] = {}
        """Invocations waiting for an instance, oldest first, by the (function, version) they need."""
        self._code_locks: dict[str, asyncio.Lock] = {}
        self._code_dirs: dict[str, Path] = {}
        self._in_flight: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._deferred: deque[tuple[tuple[str, int], Execute, contextvars.Context]] = deque()
        """Accepted invocations not started yet (beyond ``_start_limit``), oldest first, each with
        the trace context it arrived in."""
        self._deferred_keys: set[tuple[str, int]] = set()
        self._start_limit = max(64, STARTED_PER_INSTANCE * settings.max_instances)
        self._done: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._seq = 0
        self._accepting = True
        self._function_clamps: dict[str, int] = {}
        """Functions the throttler clamped as a whole on this node -> the CPU quota each new instance starts with."""
        self._pool_wakeup = asyncio.Event()
        self._beat_now = asyncio.Event()
        """Set when the pool changed: the next heartbeat goes at once rather than at its interval."""

    async def start(self) -> None:
        """Find the cgroups, clean up after a crashed predecessor, start the zygote."""
        await self._launcher.start()

    # ----- commands -------------------------------------------------------------------------

    def is_mine(self, incarnation: str) -> bool:
        """Commands for another incarnation of this node are stale: the dispatcher re-routes them."""
        return incarnation == self.incarnation

    def accept_execute(self, cmd: Execute) -> None:
        """Start running an invocation in the background (the handler returns at once)."""
        key = (cmd.invocation.id, cmd.attempt)
        if key in self._in_flight or key in self._done or key in self._deferred_keys or not self._accepting:
            return  # a redelivered command; the first copy owns the result
        if len(self._in_flight) >= self._start_limit:
            # More than the instances can take soon: kept as a command, not as a task waiting for an
            # instance (each such waiter planned, held a span and a timer, and a backlog of them was
            # walked by every garbage collection: the node slowed down the more it fell behind).
            self._deferred.append((key, cmd, contextvars.copy_context()))
            self._deferred_keys.add(key)
            if cmd.invocation.deadline_ms is not None:
                # It ends at its deadline even if no room frees up by then (deadline_passed).
                delay = max(0.0, (cmd.invocation.deadline_ms - now_ms()) / 1000)
                asyncio.get_running_loop().call_later(delay, self._start_deferred, key)
            return
        self._start(key, cmd, None)

    def _start(self, key: tuple[str, int], cmd: Execute, context: contextvars.Context | None) -> None:
        task = asyncio.create_task(self._execute(cmd), name=f"exec:{cmd.invocation.id}", context=context)
        self._in_flight[key] = task
        task.add_done_callback(lambda _task: self._finished(key))

    def _start_deferred(self, key: tuple[str, int] | None = None) -> None:
        """Start deferred invocations while there is room (or the one with ``key``, room or not)."""
        if key is not None:
            if key not in self._deferred_keys:
                return
            for entry in self._deferred:
                if entry[0] == key:
                    self._deferred.remove(entry)
                    self._deferred_keys.discard(key)
                    self._start(*entry)
                    return
        while self._deferred and len(self._in_flight) < self._start_limit:
            entry = self._deferred.popleft()
            self._deferred_keys.discard(entry[0])
            self._start(*entry)

    def _finished(self, key: tuple[str, int]) -> None:
        self._in_flight.pop(key, None)
        self._done[key] = None
        while len(self._done) > 50_000:
            self._done.popitem(last=False)
        if self._deferred:
            self._start_deferred()

    def ensure_pool(self, cmd: EnsurePool) -> None:
        self.pool_target = cmd.generic
        self._pool_wakeup.set()

    async def recycle(self, cmd: Recycle) -> None:
        for slot in list(self._slots.values()):
            inst = slot.instance
            if not ((cmd.instance and inst.id == cmd.instance) or (cmd.function and inst.function == cmd.function)):
                continue
            if inst.state in ("ready", "generic"):
                await self._retire(inst, cmd.reason or "recycle command")
            elif cmd.force:
                slot.kill_reason = cmd.reason or "killed by the throttler"
                await inst.kill()  # its invocation sees the instance die and ends with kill_reason
            elif cmd.busy_too:
                slot.retire_after_use = cmd.reason or "recycle command"

    async def clamp(self, cmd: Clamp) -> None:
        """Set (or restore) the CPU quota of instances: the throttler's first action. A clamp of a
        function (no instance named) also holds for the instances it starts later, until restored."""
        if cmd.function and not cmd.instance:
            if cmd.cpu_millis is None:
                self._function_clamps.pop(cmd.function, None)
            else:
                self._function_clamps[cmd.function] = cmd.cpu_millis
        for slot in list(self._slots.values()):
            inst = slot.instance
            if not ((cmd.instance and inst.id == cmd.instance) or (cmd.function and inst.function == cmd.function)):
                continue
            if inst.cgroup is None:
                continue
            millis = cmd.cpu_millis
            if millis is None:
                millis = slot.spec.cpu_millis if slot.spec is not None else None
            slot.clamped_millis = cmd.cpu_millis
            with contextlib.suppress(OSError):
                await asyncio.to_thread(inst.cgroup.set_cpu_quota, millis)
            log.info("cpu quota of %s set to %s millicores: %s", inst.id, millis, cmd.reason)

    async def configure(self, cmd: ConfigureNode) -> None:
        """Labels, taints, cordon and drain of this node, changed at run time."""
        for key, value in cmd.labels.items():
            if value is None:
                self.labels.pop(key, None)
            else:
                self.labels[key] = value
        if cmd.remove_taints:
            self.taints = [t for t in self.taints if t.key not in cmd.remove_taints]
        for taint in cmd.add_taints:
            self.taints = [t for t in self.taints if not (t.key == taint.key and t.effect == taint.effect)] + [taint]
        if cmd.unschedulable is not None:
            self.unschedulable = cmd.unschedulable
        if cmd.drain:
            self.unschedulable = True
            self.pool_target = 0
        for slot in list(self._slots.values()):
            spec = slot.spec
            leave = cmd.drain or (spec is not None and placement.must_leave(self._node_view(), spec.tolerations))
            if not leave:
                continue
            reason = "node drained" if cmd.drain else "NoExecute taint the function does not tolerate"
            if slot.instance.state in ("ready", "generic"):
                await self._retire(slot.instance, reason)
            else:
                slot.retire_after_use = reason
        self._pool_wakeup.set()
        await self._publish(self.heartbeat(), self.topics.node, self.settings.node)

    def _node_view(self) -> NodeHeartbeat:
        return NodeHeartbeat(
            node=self.settings.node,
            incarnation=self.incarnation,
            labels=self.labels,
            taints=self.taints,
            unschedulable=self.unschedulable,
        )

    def specialize(self, cmd: Specialize) -> None:
        for _ in range(cmd.count):
            self._spawn_task(self._prewarm(cmd.spec))

    # ----- execution --------------------------------------------------------------------------

    async def _execute(self, cmd: Execute) -> None:
        inv, spec = cmd.invocation, cmd.spec
        outcome = _Outcome(cmd, self.settings.node)
        try:
            if inv.expired(now_ms()):
                outcome.fail("timeout", "deadline_passed", "deadline passed before it could run")
                return
            started = time.perf_counter()
            attributes = {
                telemetry.INVOCATION_ID: inv.id,
                telemetry.FUNCTION: inv.function,
                telemetry.NODE: self.settings.node,
            }
            while True:
                with _CurrentSpan("stoker start", attributes) as span:
                    outcome.queue_ms = max(0.0, now_ms() - inv.requested_ms)
                    slot, kind, queued = await self._acquire(spec, inv.deadline_ms)
                    span.set_attribute(telemetry.START_KIND, kind if isinstance(kind, str) else "failed")
                    if kind == "prewarmed" and slot is not None and slot.prewarm_trace is not None:
                        # One build trace (webhook -> build -> artifact -> prewarm -> specialize), linked here.
                        span.add_link(slot.prewarm_trace, {"stoker.link": "prewarmed-by"})
                outcome.start_ms = (time.perf_counter() - started) * 1000
                if slot is None:
                    outcome.fail("timeout", "deadline_passed", "no instance became free before the deadline")
                elif isinstance(kind, ErrorInfo):
                    outcome.instance = slot.instance.id
                    outcome.fail("error", kind.kind, kind.message, kind.traceback)
                else:
                    outcome.start, outcome.instance = kind, slot.instance.id
                    try:
                        await self._run(cmd, slot, outcome, queued)
                    except _Requeue:
                        await asyncio.sleep(0)  # let the instance's end be seen before planning again
                        continue  # it never ran: another instance, or another place in line
                break
        except Exception as exc:  # noqa: BLE001 - every accepted invocation must end with a result
            log.exception("invocation %s failed inside the agent", inv.id)
            outcome.fail("error", "agent_error", repr(exc))
        finally:
            await self._complete(inv.reply_to, outcome.result())

    async def _run(self, cmd: Execute, slot: _Slot, outcome: _Outcome, queued: bool = False) -> None:
        inv, spec = cmd.invocation, cmd.spec
        inst = slot.instance
        timeout_s = spec.timeout_s
        if inv.deadline_ms is not None:
            timeout_s = max(0.001, min(timeout_s, (inv.deadline_ms - now_ms()) / 1000))
        msg = {
            "op": "invoke",
            "id": inv.id,
            "payload": inv.payload,
            "deadline_ms": inv.deadline_ms,
            "max_output_bytes": spec.max_output_bytes,
        }
        attributes = {telemetry.INVOCATION_ID: inv.id, telemetry.FUNCTION: inv.function, "stoker.instance": inst.id}
        send = self._run_queued if queued else self._run_now
        reply = await send(slot, spec, msg, timeout_s, attributes, outcome)
        if reply is None:
            return
        inst.uses += 1
        inst.last_used_at = time.monotonic()
        outcome.logs = reply.get("logs")
        outcome.exec_ms = float(reply.get("exec_ms", 0.0))
        if reply.get("ok"):
            outcome.status, outcome.output = "ok", reply.get("output")
            await self._after_use(slot, spec, outcome)
            return
        err = reply.get("error") or {}
        outcome.fail("error", err.get("kind", "Error"), err.get("message", ""), err.get("traceback"))
        if self._pids_hits(inst) > outcome.pids_hits:
            # A fork bomb: its children may still be forking; the instance goes, with all of them.
            outcome.fail("error", "pids_limit", f"hit its limit of {spec.pids_limit} processes: {err.get('message')}")
            if slot.runner is not outcome:  # the invocation queued behind it has begun: it goes too
                slot.kill_reason = "the invocation before it on this instance hit its pids limit"
            await self._retire(inst, "hit its pids limit")
            return
        await self._after_use(slot, spec, outcome)

    def _begin(self, slot: _Slot, spec: FunctionSpec, outcome: _Outcome) -> None:
        """``outcome``'s invocation is the one the instance runs now."""
        slot.runner, slot.runner_keeps = outcome, _keeps(spec)
        outcome.pids_hits = self._pids_hits(slot.instance)
        if slot.runner_keeps and not slot.queued:
            self._wake_one((slot.instance.function, slot.instance.function_version))  # room behind it

    async def _run_now(
        self,
        slot: _Slot,
        spec: FunctionSpec,
        msg: dict[str, Any],
        timeout_s: float,
        attributes: dict[str, Any],
        outcome: _Outcome,
    ) -> dict[str, Any] | None:
        """Send the invocation to an instance that has nothing else to do; None when it failed."""
        inst = slot.instance
        self._begin(slot, spec, outcome)
        with _CurrentSpan("stoker exec", attributes):
            try:
                return await inst.request(msg, timeout_s)  # type: ignore[no-any-return]
            except (InstanceTimeout, InstanceDied) as exc:
                await self._failed(slot, spec, timeout_s, outcome, exc)
                return None

    async def _run_queued(
        self,
        slot: _Slot,
        spec: FunctionSpec,
        msg: dict[str, Any],
        timeout_s: float,
        attributes: dict[str, Any],
        outcome: _Outcome,
    ) -> dict[str, Any] | None:
        """Queue the invocation behind the one the instance runs; None when it failed.

        Raises :class:`_Requeue` when the instance went before it began.
        """
        inst = slot.instance
        queued_at = time.perf_counter()
        began: list[int] = []

        def on_start() -> None:
            slot.queued = False
            began.append(time.time_ns())
            self._begin(slot, spec, outcome)
            outcome.start_ms += (time.perf_counter() - queued_at) * 1000  # waiting in line is starting

        try:
            reply: dict[str, Any] = await inst.request_after(msg, timeout_s, on_start)
        except NotStarted:
            slot.queued = False
            raise _Requeue() from None
        except (InstanceTimeout, InstanceDied) as exc:
            self._exec_span(attributes, began)
            await self._failed(slot, spec, timeout_s, outcome, exc)
            return None
        self._exec_span(attributes, began)
        return reply

    def _exec_span(self, attributes: dict[str, Any], began: list[int]) -> None:
        # From when the instance began it, not from when it was queued.
        tracer.start_span("stoker exec", attributes=attributes, start_time=began[0] if began else None).end()

    async def _failed(
        self, slot: _Slot, spec: FunctionSpec, timeout_s: float, outcome: _Outcome, exc: Exception
    ) -> None:
        """The instance timed out (and was killed) or died while running ``outcome``'s invocation."""
        inst = slot.instance
        if isinstance(exc, InstanceTimeout):
            outcome.exec_ms = timeout_s * 1000
            if self._pids_hits(inst) > outcome.pids_hits:
                outcome.fail("error", "pids_limit", f"hit its limit of {spec.pids_limit} processes; killed")
            else:
                outcome.fail("timeout", "timeout", f"ran past its timeout of {timeout_s:.3f}s; instance killed")
            await self._gone(inst, f"killed: {outcome.error.kind if outcome.error else 'timeout'}")
            return
        assert isinstance(exc, InstanceDied)
        await self._gone(inst, slot.kill_reason or str(exc))
        if slot.kill_reason:
            outcome.fail("error", "killed", f"{slot.kill_reason} ({exc})")
        else:
            outcome.fail("error", exc.kind, str(exc))

    def _pids_hits(self, inst: Instance) -> int:
        if inst.cgroup is None:
            return 0
        try:
            return inst.cgroup.pids_limit_hits()
        except OSError:
            return 0

    async def _after_use(self, slot: _Slot, spec: FunctionSpec, outcome: _Outcome) -> None:
        """What the function's reuse type says happens to the instance after an invocation."""
        if slot.runner is not outcome:
            return  # the invocation queued behind this one has begun: the instance is its now
        slot.runner = None
        inst = slot.instance
        if slot.retire_after_use:
            await self._retire(inst, slot.retire_after_use)
            return
        if spec.reuse == "fresh":
            await self._retire(inst, "reuse=fresh: one invocation per instance")
            return
        if spec.reuse == "reset" and inst.alive:
            if inst.uses >= spec.reset_max_uses:
                await self._retire(inst, f"reuse=reset: re-created after {spec.reset_max_uses} uses")
                return
            try:
                reply = await inst.request({"op": "reset"}, 5.0)
            except (InstanceTimeout, InstanceDied) as exc:
                await self._gone(inst, f"reset failed: {exc}")
                return
            if not reply.get("ok") or reply.get("threads_left"):
                await self._retire(inst, f"reset cannot undo threads it left: {reply.get('threads_left')}")
                return
            left = await self._launcher.generic(inst)
            if left:
                await self._retire(inst, left)
                return
            inst.function = inst.function_version = None
            slot.prewarmed, slot.prewarm_trace = False, None
            self._set_state(inst, "generic")
            self._emit(inst, "generic", reason="reset after an invocation")
            self._wake_all()
            return
        await self._release(inst, spec)

    async def _complete(self, reply_to: str | None, result: InvocationCompleted) -> None:
        writes = result_writes(result, self.topics.result, reply_to)
        await self._publish_result(result, [w.topic for w in writes], result.id)

    async def _acquire(self, spec: FunctionSpec, deadline_ms: int | None) -> tuple[_Slot | None, Any, bool]:
        """Get an instance holding ``spec``'s code: (slot, start kind or ErrorInfo, whether the
        invocation is queued behind the one the instance is running)."""
        code_dir = await self._code_dir(spec)
        version = spec.code_version
        while True:
            plan = pool.plan_start(
                self._facts_for(spec.name, version),
                spec.name,
                version,
                max_instances=self.settings.max_instances,
                starting=self._starting,
            )
            if plan.kind in ("warm", "prewarmed"):
                slot = self._slots[plan.instance]  # type: ignore[index]
                slot.prewarmed = False
                self._set_state(slot.instance, "busy")
                return slot, plan.kind, False
            if plan.kind == "pool":
                slot = self._slots[plan.instance]  # type: ignore[index]
                self._set_state(slot.instance, "specializing", spec)
                self._pool_wakeup.set()  # refill the pool in the background
                return slot, await self._load(slot, spec, code_dir, "pool"), False
            if plan.kind in ("start", "evict"):
                if plan.kind == "evict":
                    await self._retire(self._slots[plan.instance].instance, "evicted for another function")  # type: ignore[index]
                fresh = await self._start_instance()
                if fresh is None:
                    continue
                self._set_state(fresh.instance, "specializing", spec)
                return fresh, await self._load(fresh, spec, code_dir, fresh.instance.origin), False
            # wait: every slot is busy
            remaining = None if deadline_ms is None else (deadline_ms - now_ms()) / 1000
            if remaining is not None and remaining <= 0:
                return None, None, False
            behind = self._queue_behind(spec)
            if behind is not None:
                return behind, "warm", True
            handed = await self._wait_for_instance(spec.name, version, min(remaining or WAIT_RECHECK_S, WAIT_RECHECK_S))
            if handed is not None:
                kind = "prewarmed" if handed.prewarmed else "warm"
                handed.prewarmed = False
                return handed, kind, False

    def _queue_behind(self, spec: FunctionSpec) -> _Slot | None:
        """A busy instance of ``spec``'s code to queue the invocation behind, when that cannot
        change what happens to either invocation: both leave the instance as they found it, and
        nothing is due to happen to the instance (retire, kill) once the running one ends."""
        if not _keeps(spec):
            return None
        for slot in self._slots.values():
            inst = slot.instance
            if (
                slot.runner is not None
                and slot.runner_keeps
                and not slot.queued
                and inst.state == "busy"
                and inst.function == spec.name
                and inst.function_version == spec.code_version
                and slot.retire_after_use is None
                and slot.kill_reason is None
                and inst.alive
                and inst.channel is not None
                and not inst.channel.closed
            ):
                slot.queued = True
                return slot
        return None

    async def _wait_for_instance(self, function: str, version: str, timeout_s: float) -> _Slot | None:
        """Wait until an instance of ``function`` is handed over (or anything else changed: None)."""
        waiter: asyncio.Future[_Slot | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault((function, version), deque()).append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and (slot := waiter.result()) is not None:
                self._set_state(slot.instance, "ready")
                self._offer(slot)  # handed over as this invocation was cancelled: the next one takes it
            raise
        # A hand-over can land just as the timeout fires: the instance is this invocation's then.
        return waiter.result() if waiter.done() and not waiter.cancelled() else None

    def _offer(self, slot: _Slot) -> None:
        """A ready instance goes straight to the oldest invocation waiting for its code (it is busy
        then); with none, every waiter plans again (one may evict it or start an instance)."""
        inst = slot.instance
        key = (inst.function, inst.function_version)
        queue = self._waiting.get(key)
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                self._set_state(inst, "busy")
                waiter.set_result(slot)
                break
        else:
            self._waiting.pop(key, None)
            self._wake_all()
            return
        if not queue:
            self._waiting.pop(key, None)

    def _wake_one(self, key: tuple[str | None, str | None]) -> None:
        """The oldest invocation waiting for ``key``'s code plans again (there is room behind one)."""
        queue = self._waiting.get(key)
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break
        if queue is not None and not queue:
            self._waiting.pop(key, None)

    def _wake_all(self) -> None:
        """Something changed for every waiter (an instance went, came or turned generic): all plan again."""
        if not self._waiting:
            return
        waiting, self._waiting = self._waiting, {}
        for queue in waiting.values():
            for waiter in queue:
                if not waiter.done():
                    waiter.set_result(None)

    async def _load(self, slot: _Slot, spec: FunctionSpec, code_dir: Path, kind: str) -> Any:
        inst = slot.instance
        try:
            code_path = await self._launcher.attach(inst, spec, code_dir)  # the code into its sandbox
        except (SandboxError, OSError) as exc:
            await self._retire(inst, f"sandbox: {exc}")
            return ErrorInfo(kind="sandbox", message=str(exc))
        msg = {
            "op": "load",
            "code_dir": code_path,
            "entrypoint": spec.entrypoint,
            "env": spec.env,
            "function": spec.name,
            "version": spec.code_version,
        }
        try:
            reply = await inst.request(msg, max(5.0, spec.timeout_s))
        except (InstanceTimeout, InstanceDied) as exc:
            await self._gone(inst, f"failed to load code: {exc}")
            return ErrorInfo(kind="load_failed", message=str(exc))
        if not reply.get("ok"):
            err = reply.get("error") or {}
            # A failed import can leave half a module behind: this interpreter is not reused.
            await self._retire(inst, f"code failed to load: {err.get('kind', 'Error')}: {err.get('message', '')}")
            return ErrorInfo(
                kind=f"load_failed:{err.get('kind', 'Error')}",
                message=err.get("message", ""),
                traceback=err.get("traceback"),
            )
        clamped = self._function_clamps.get(spec.name) if inst.cgroup is not None else None
        # Clamped before it holds the function's code: no metric sample shows it running free.
        slot.clamped_millis = clamped
        inst.function, inst.function_version = spec.name, spec.code_version
        inst.last_used_at = time.monotonic()  # idle time counts from when the code was loaded
        slot.spec = spec
        await self._launcher.specialized(inst, spec)
        if clamped is not None and inst.cgroup is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(inst.cgroup.set_cpu_quota, clamped)
        self._set_state(inst, "busy", spec)
        self._emit(inst, "ready", reason=f"specialized ({kind}) in {reply.get('load_ms', 0):.1f} ms")
        return kind

    async def _release(self, inst: Instance, spec: FunctionSpec) -> None:
        if not inst.alive:
            await self._gone(inst, "exited after the invocation")
            return
        slot = self._slots.get(inst.id)
        if slot is not None and slot.retire_after_use:
            await self._retire(inst, slot.retire_after_use)
            return
        self._set_state(inst, "ready")
        facts = self._facts_of(slot) if slot is not None else None
        reason = facts and pool.due_for_recycling(facts, pool.RecyclePolicy(spec.max_invocations, spec.max_age_s))
        if reason:
            await self._retire(inst, reason)
        elif slot is not None:
            self._offer(slot)

    async def _prewarm(self, spec: FunctionSpec) -> None:
        attributes = {
            telemetry.FUNCTION: spec.name,
            telemetry.NODE: self.settings.node,
            "stoker.version": spec.code_version,
        }
        with tracer.start_as_current_span("stoker specialize", attributes=attributes) as span:
            try:
                code_dir = await self._code_dir(spec)
            except ArtifactError as exc:
                log.error("cannot prewarm %s: %s", spec.name, exc)
                span.set_attribute("stoker.prewarm", f"failed: {exc}")
                return
            plan = pool.plan_start(
                self._facts(), "", "", max_instances=self.settings.max_instances, starting=self._starting
            )
            slot: _Slot | None
            if plan.kind == "pool" and plan.instance is not None:
                slot = self._slots[plan.instance]
            elif plan.kind == "start":
                slot = await self._start_instance()
            else:
                slot = None  # no room: prewarming never evicts
            if slot is None:
                span.set_attribute("stoker.prewarm", "no room")
                return
            self._set_state(slot.instance, "specializing", spec)
            kind = await self._load(slot, spec, code_dir, "prewarm")
            if isinstance(kind, str):
                slot.prewarmed = True
                slot.prewarm_trace = span.get_span_context()
                self._set_state(slot.instance, "ready")
                self._offer(slot)
            span.set_attribute("stoker.prewarm", "ready" if isinstance(kind, str) else "failed")

    # ----- code cache -------------------------------------------------------------------------

    async def _code_dir(self, spec: FunctionSpec) -> Path:
        if not spec.source.digest or not spec.source.uri:
            raise ArtifactError(f"function {spec.name} has no artifact to run")
        return await self.ensure_code(spec.source.digest, spec.source.uri)

    def sync_artifact(self, digest: str, uri: str) -> None:
        """Bring a newly built artifact into the node's code cache before any instance needs it."""

        async def sync() -> None:
            try:
                started = time.perf_counter()
                path = await self.ensure_code(digest, uri)
                log.info("synced %s into %s in %.1f ms", digest, path, (time.perf_counter() - started) * 1000)
            except ArtifactError as exc:
                log.error("could not sync artifact %s: %s", digest, exc)

        self._spawn_task(sync())

    async def ensure_code(self, digest: str, uri: str) -> Path:
        """The verified, unpacked code of ``digest`` in this node's cache (fetched once)."""
        known = self._code_dirs.get(digest)
        if known is not None:
            return known  # every invocation asks: no stat once the code is in the cache
        dest = self.settings.node_dir / "code" / digest.replace(":", "-")
        if not dest.is_dir():
            lock = self._code_locks.setdefault(digest, asyncio.Lock())
            async with lock:
                if not dest.is_dir():
                    blob = await asyncio.to_thread(self._store.get, uri)
                    await asyncio.to_thread(unpack_verified, blob, digest, dest)
        self._code_dirs[digest] = dest
        return dest

    # ----- instances --------------------------------------------------------------------------

    async def _start_instance(self) -> _Slot | None:
        self._starting += 1
        try:
            inst = await self._launcher.new_instance()
        except (InstanceDied, OSError, CgroupError) as exc:
            log.error("could not start an instance: %s", exc)
            self._wake_all()  # the room it held is free again
            return None
        finally:
            self._starting -= 1
        slot = _Slot(inst)
        self._slots[inst.id] = slot
        self._emit(inst, "generic")
        return slot

    async def maintain_pool(self) -> None:
        """Keep ``pool_target`` generic instances; runs until cancelled."""
        while True:
            deficit = pool.generic_deficit(
                self._facts(),
                target=self.pool_target,
                max_instances=self.settings.max_instances,
                starting=self._starting,
            )
            if deficit:
                await asyncio.gather(*(self._start_instance() for _ in range(deficit)))
                self._wake_all()
                self._beat_now.set()
                continue
            generic = [s.instance for s in self._slots.values() if s.instance.state == "generic"]
            for inst in generic[self.pool_target :]:
                await self._retire(inst, "pool shrunk")
            self._pool_wakeup.clear()
            try:
                # Every change sets the wakeup; the timer is only a safety net.
                await asyncio.wait_for(self._pool_wakeup.wait(), timeout=5.0)
            except TimeoutError:
                pass

    async def _retire(self, inst: Instance, reason: str) -> None:
        if inst.id not in self._slots:
            return
        self._set_state(inst, "recycling", reason=reason)
        await self._gone(inst, reason)

    async def _gone(self, inst: Instance, reason: str) -> None:
        if self._slots.pop(inst.id, None) is None:
            return
        await inst.destroy()
        inst.state = "gone"
        self._emit(inst, "gone", reason=reason)
        self._pool_wakeup.set()
        self._wake_all()

    def _set_state(
        self, inst: Instance, state: InstanceState, spec: FunctionSpec | None = None, reason: str = ""
    ) -> None:
        inst.state = state
        if spec is not None:
            inst.function, inst.function_version = spec.name, spec.code_version
        # busy <-> ready flips happen on every invocation: they travel in heartbeats, not events.
        if state in ("specializing", "recycling"):
            self._emit(inst, state, reason=reason)

    def _emit(self, inst: Instance, state: InstanceState, reason: str = "") -> None:
        event = InstanceChanged(
            node=self.settings.node,
            incarnation=self.incarnation,
            instance=inst.id,
            state=state,
            pid=inst.pid,
            function=inst.function,
            function_version=inst.function_version,
            uses=inst.uses,
            reason=reason,
        )
        self._spawn_task(self._publish(event, self.topics.instance, self.settings.node))

    def _spawn_task(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _facts_of(self, slot: _Slot, now: float | None = None) -> pool.InstanceFacts:
        inst = slot.instance
        now = now or time.monotonic()
        return pool.InstanceFacts(
            id=inst.id,
            state=inst.state,
            function=inst.function,
            function_version=inst.function_version,
            uses=inst.uses,
            idle_ms=inst.idle_ms(now),
            age_ms=int((now - inst.created_at) * 1000),
            prewarmed=slot.prewarmed,
        )

    def _facts(self) -> list[pool.InstanceFacts]:
        now = time.monotonic()
        return [self._facts_of(s, now) for s in self._slots.values()]

    def _facts_for(self, function: str, version: str) -> list[pool.InstanceFacts]:
        """What ``plan_start`` needs for one function: its ready instances alone when it has some
        (the plan takes one of them, whatever the rest are), else every instance."""
        now = time.monotonic()
        ready = [
            self._facts_of(s, now)
            for s in self._slots.values()
            if s.instance.state == "ready"
            and s.instance.function == function
            and s.instance.function_version == version
        ]
        return ready or self._facts()

    # ----- node -------------------------------------------------------------------------------

    def heartbeat(self) -> NodeHeartbeat:
        self._seq += 1
        now = time.monotonic()
        return NodeHeartbeat(
            node=self.settings.node,
            incarnation=self.incarnation,
            labels={**self.labels, **self._launcher.notes},
            taints=self.taints,
            capacity=NodeCapacity(
                max_instances=self.settings.max_instances,
                cpu_millis=self.settings.cpu_millis,
                memory_mb=self.settings.memory_mb,
            ),
            unschedulable=self.unschedulable,
            pool_target=self.pool_target,
            in_flight=len(self._in_flight) + len(self._deferred),
            seq=self._seq,
            interval_ms=int(self.settings.heartbeat_interval_s * 1000),
            instances=[
                InstanceSummary(
                    instance=s.instance.id,
                    state=s.instance.state,
                    pid=s.instance.pid,
                    function=s.instance.function,
                    function_version=s.instance.function_version,
                    uses=s.instance.uses,
                    idle_ms=s.instance.idle_ms(now),
                )
                for s in self._slots.values()
            ],
        )

    def metrics(self, interval_s: float) -> NodeMetrics:
        """Read every instance's cgroup (blocking file reads: run it in a thread)."""
        figures = []
        for slot in list(self._slots.values()):
            inst = slot.instance
            if inst.cgroup is None or not inst.alive:
                continue
            try:
                stats = inst.cgroup.stats()
            except OSError:
                continue
            cpu = 0.0 if slot.last_cpu_ns is None else (stats.cpu_usage_ns - slot.last_cpu_ns) / 1e6 / interval_s
            throttled = (
                0.0 if slot.last_throttled_ns is None else (stats.cpu_throttled_ns - slot.last_throttled_ns) / 1e6
            )
            wait: float | None = None
            if stats.cpu_wait_ns is not None and slot.last_wait_ns is not None:
                wait = round(max(0.0, (stats.cpu_wait_ns - slot.last_wait_ns) / 1e6), 2)
            periods = None if slot.last_nr_throttled is None else max(0, stats.nr_throttled - slot.last_nr_throttled)
            slot.last_cpu_ns, slot.last_throttled_ns = stats.cpu_usage_ns, stats.cpu_throttled_ns
            slot.last_wait_ns, slot.last_nr_throttled = stats.cpu_wait_ns, stats.nr_throttled
            quota = slot.clamped_millis or (slot.spec.cpu_millis if slot.spec is not None else None)
            figures.append(
                InstanceMetrics(
                    instance=inst.id,
                    function=inst.function,
                    function_version=inst.function_version,
                    state=inst.state,
                    cpu_millis=round(max(0.0, cpu), 1),
                    memory_mb=round(stats.memory_bytes / 2**20, 2),
                    pids=stats.pids,
                    throttled_ms=round(max(0.0, throttled), 2),
                    cpu_quota_millis=quota,
                    clamped=slot.clamped_millis is not None,
                    cpu_wait_ms=wait,
                    nr_throttled=periods,
                )
            )
        return NodeMetrics(
            node=self.settings.node,
            incarnation=self.incarnation,
            interval_ms=int(interval_s * 1000),
            instances=figures,
            cpu_millis=round(sum(f.cpu_millis for f in figures), 1),
            memory_mb=round(sum(f.memory_mb for f in figures), 2),
            pressure=node_pressure(read_host_pressure()),
        )

    async def send_metrics(self) -> None:
        """Every interval, each instance's CPU, memory, pids and throttling from its cgroup."""
        interval = self.settings.metric_interval_s
        while True:
            await asyncio.sleep(interval)
            if not any(slot.instance.function is not None for slot in self._slots.values()):
                # Nobody to judge: no reading (a thread and a file read per instance), and the
                # next reading starts afresh rather than from one taken before the gap.
                for slot in self._slots.values():
                    slot.last_cpu_ns = slot.last_throttled_ns = slot.last_wait_ns = slot.last_nr_throttled = None
                continue
            try:
                record = await asyncio.to_thread(self.metrics, interval)
                # Sampled every interval (CPU is a difference between samples), published only
                # when an instance holds user code: generic ones are not judged by the throttler,
                # and an idle node would otherwise send a record a second for nobody.
                if any(f.function is not None for f in record.instances):
                    with telemetry.untraced():
                        await self._publish(record, self.topics.node_metric, self.settings.node)
            except Exception:  # noqa: BLE001 - a missed interval is survivable
                log.exception("metrics failed")

    async def send_heartbeats(self) -> None:
        while True:
            try:
                with telemetry.untraced():
                    await self._publish(self.heartbeat(), self.topics.node, self.settings.node)
            except Exception:  # noqa: BLE001 - a missed heartbeat is survivable; a dead loop is not
                log.exception("heartbeat failed")
            self._beat_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), timeout=self.settings.heartbeat_interval_s)

    async def shutdown(self) -> None:
        """Finish in-flight work (bounded), stop every instance, and say goodbye."""
        self._accepting = False
        self._start_limit = len(self._in_flight) + len(self._deferred)
        self._start_deferred()  # drained like the rest
        if self._in_flight:
            await asyncio.wait(list(self._in_flight.values()), timeout=self.settings.drain_timeout_s)
        await asyncio.gather(*(slot.instance.destroy() for slot in self._slots.values()), return_exceptions=True)
        self._slots.clear()
        await self._launcher.stop()
        try:
            await self._publish(
                NodeStopped(node=self.settings.node, incarnation=self.incarnation), self.topics.node, self.settings.node
            )
        except Exception:  # noqa: BLE001
            log.exception("could not announce the shutdown")


class _CurrentSpan:
    """``tracer.start_as_current_span`` without its generator-based context managers (each
    invocation opens two: this costs about half as much)."""

    __slots__ = ("span", "_token")

    def __init__(self, name: str, attributes: dict[str, Any]) -> None:
        self.span = tracer.start_span(name, attributes=attributes)
        self._token: Any = None

    def __enter__(self) -> trace.Span:
        self._token = otel_context.attach(trace.set_span_in_context(self.span))
        return self.span

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        otel_context.detach(self._token)
        if isinstance(exc, Exception):
            self.span.record_exception(exc)
            self.span.set_status(SpanStatus(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        self.span.end()


class _Outcome:
    """What one Execute came to; every path through ``_execute`` ends in exactly one result."""

    def __init__(self, cmd: Execute, node: str) -> None:
        self.cmd, self.node = cmd, node
        self.status: Status = "error"
        self.output: Any = None
        self.error: ErrorInfo | None = None
        self.start: StartKind | None = None
        self.instance: str | None = None
        self.logs: str | None = None
        self.queue_ms = self.start_ms = self.exec_ms = 0.0
        self.pids_hits = 0
        """The instance's pids-limit hits when it began this invocation."""

    def fail(self, status: Status, kind: str, message: str, traceback: str | None = None) -> None:
        self.status, self.error = status, ErrorInfo(kind=kind, message=message, traceback=traceback)

    def result(self) -> InvocationCompleted:
        inv = self.cmd.invocation
        return InvocationCompleted(
            id=inv.id,
            function=inv.function,
            status=self.status,
            output=self.output,
            error=self.error,
            start=self.start,
            node=self.node,
            instance=self.instance,
            function_version=self.cmd.spec.code_version,
            attempt=self.cmd.attempt,
            logs=self.logs,
            principal=inv.principal,
            timings_ms=Timings(
                queue=round(self.queue_ms, 3),
                start=round(self.start_ms, 3),
                exec=round(self.exec_ms, 3),
                total=round(max(0.0, time.time() * 1000 - inv.requested_ms), 3),
            ),
        )


def node_pressure(host: HostPressure) -> NodeCpuPressure:
    """The host's pressure as the node metrics carry it: PSI where the kernel has it, else the run queue.

    The agent's instances run on its host, so the host's pressure is the node's (a host that
    runs several nodes reports the same figures for each).
    """
    return NodeCpuPressure(
        source="psi" if host.cpu_some_avg10 is not None else "run queue",
        cpu_some_avg10=host.cpu_some_avg10,
        procs_running=host.procs_running,
        load1=host.load1,
        cores=host.cores,
    )
