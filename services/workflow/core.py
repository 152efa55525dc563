"""The workflow engine's runs for one term as the active copy, driven by :func:`plan.next_actions`.

Everything the engine does is a write submitted to ``submit(outs, acks)`` (in the platform, the
active copy's :class:`~services.common.leadership.FencedWriter`: Kafka transactions, in the
order submitted). What one event leads to is one submission: a run's start, its first steps'
``step-started`` records, their invocation requests and the workflow invocation's offset; a step's
result, its ``step-finished``, the next steps and the result's offset; a run's end, its result
and the reply copy. So a step's invocation is requested exactly when its start is recorded, and a
record read is committed exactly when what it caused is written: a new active copy that replays
the run topic and reads on from the committed offsets neither repeats nor misses anything.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from opentelemetry import propagate, trace

from events import (
    ErrorInfo,
    InvocationCompleted,
    InvocationRequested,
    PrewarmRequested,
    Record,
    RunFinished,
    RunStarted,
    StepFinished,
    StepStarted,
    Timings,
    Topics,
    WorkflowSpec,
    now_ms,
)
from services.common import telemetry
from services.common.delivery import result_writes
from services.common.leadership import Ack, Out
from services.workflow import plan

log = logging.getLogger("stoker.workflow")
tracer = trace.get_tracer("stoker.workflow")

Submit = Callable[[Sequence[Out], Sequence[Ack]], "asyncio.Future[None]"]
"""Queue records and consumed positions for one transaction, after every earlier submission."""


async def _any_topic(_topic: str) -> bool:
    return True


class Engine:
    """Every run in memory, driven by :func:`plan.next_actions`; writes via ``submit``."""

    def __init__(
        self,
        topics: Topics,
        submit: Submit,
        *,
        reply_topic: str,
        topic_exists: Callable[[str], Awaitable[bool]] = _any_topic,
    ) -> None:
        self.topics = topics
        self.reply_topic = reply_topic
        self.runs: dict[str, plan.RunState] = {}
        self.started: dict[str, StepStarted] = {}
        """Every step attempt by invocation id (to route results)."""
        self.traces: dict[str, dict[str, str]] = {}
        self._submit = submit
        self._topic_exists = topic_exists
        self._locks: dict[str, asyncio.Lock] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ----- recovery ---------------------------------------------------------------------------

    def replay(self, event: Record) -> None:
        if isinstance(event, RunStarted):
            if event.run not in self.runs:
                self.runs[event.run] = plan.RunState.start(event)
                self.traces[event.run] = dict(event.trace)
            return
        run = getattr(event, "run", None)
        state = self.runs.get(run) if run else None
        if state is None:
            return
        if isinstance(event, StepStarted):
            self.started[event.invocation] = event
        state.apply(event)  # type: ignore[arg-type]

    async def resume(self) -> list[asyncio.Future[None]]:
        """After the replay: drive every open run. Attempts in flight are not asked for again: their
        requests were written with their ``step-started`` records, and their results come on the
        reply topic from its committed offset."""
        writes = []
        for run, state in list(self.runs.items()):
            if not state.finished:
                log.info("resuming run %s of %s", run, state.spec.name)
                writes.append(await self.drive(run))
        return writes

    def close(self) -> None:
        """End of the term: no timer fires any more."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in self._tasks:
            task.cancel()

    # ----- events in ----------------------------------------------------------------------------

    async def on_invocation(
        self, inv: InvocationRequested, spec: WorkflowSpec | None, ack: Ack | None = None
    ) -> asyncio.Future[None]:
        acks = [ack] if ack is not None else []
        if inv.id in self.runs:
            return self._submit((), acks)  # a redelivered request: the run exists already
        if spec is None:
            error = ErrorInfo(kind="unknown_function", message=f"no workflow named {inv.function!r}")
            result = InvocationCompleted(id=inv.id, function=inv.function, status="rejected", error=error)
            return self._submit(await self._results(result, inv.reply_to), acks)
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        started = RunStarted(
            run=inv.id,
            workflow=spec,
            input=inv.payload,
            reply_to=inv.reply_to,
            deadline_ms=inv.deadline_ms,
            requested_ms=inv.requested_ms,
            trace=carrier,
        )
        self.runs[inv.id] = plan.RunState.start(started)
        self.traces[inv.id] = carrier
        async with self._lock(inv.id):
            return await self._drive(inv.id, [self._event(started)], acks)

    async def on_result(self, result: InvocationCompleted, ack: Ack | None = None) -> asyncio.Future[None]:
        acks = [ack] if ack is not None else []
        started = self.started.get(result.id)
        state = self.runs.get(started.run) if started else None
        if state is None or started is None:
            return self._submit((), acks)
        async with self._lock(started.run):
            event = state.result(result, now_ms())
            if event is None:
                return self._submit((), acks)  # not current (a late result of an attempt given up)
            state.apply(event)
            return await self._drive(started.run, [self._event(event)], acks)

    # ----- driving --------------------------------------------------------------------------------

    def _lock(self, run: str) -> asyncio.Lock:
        return self._locks.setdefault(run, asyncio.Lock())

    async def drive(self, run: str) -> asyncio.Future[None]:
        async with self._lock(run):
            return await self._drive(run, [], [])

    async def _drive(self, run: str, outs: list[Out], acks: list[Ack]) -> asyncio.Future[None]:
        """Apply what the planner decides now; submit it (with ``outs`` and ``acks``) as one write."""
        state = self.runs[run]
        while not state.finished:
            actions = plan.next_actions(state, now_ms())
            if not actions:
                break
            progressed = False
            for action in actions:
                if isinstance(action, plan.FinishRun):
                    outs.extend(await self._finish(state, action))
                    progressed = True
                    break
                if action.event is not None:
                    outs.append(self._event(action.event))
                    progressed = state.apply(action.event) or progressed
                if isinstance(action, plan.StartStep):
                    self.started[action.invocation_id] = action.event
                    outs.append(self._request(state, action))
                elif isinstance(action, plan.Prewarm):
                    request = PrewarmRequested(function=action.function, count=action.count, reason=action.reason)
                    outs.append(Out(self.topics.prewarm, request, action.function))
            if not progressed:
                break
        written = self._submit(outs, acks)
        self._arm(run)
        return written

    def _arm(self, run: str) -> None:
        timer = self._timers.pop(run, None)
        if timer is not None:
            timer.cancel()
        state = self.runs[run]
        if state.finished:
            self._locks.pop(run, None)
            return
        wake = state.next_wakeup(now_ms())
        if wake is not None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, (wake - now_ms()) / 1000)
            self._timers[run] = loop.call_later(delay, self._wake_up, run)

    def _wake_up(self, run: str) -> None:
        self._timers.pop(run, None)
        task = asyncio.get_running_loop().create_task(self._timed(run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _timed(self, run: str) -> None:
        written = await self.drive(run)
        # A failed write ends the term (the writer's failure is watched there): nothing to do here.
        written.add_done_callback(lambda fut: fut.cancelled() or fut.exception())

    def _event(self, event: RunStarted | StepStarted | StepFinished | RunFinished) -> Out:
        return Out(self.topics.workflow_run, event, event.run)

    def _request(self, state: plan.RunState, action: plan.StartStep) -> Out:
        request = action.request(self.reply_topic)
        parent = propagate.extract(self.traces.get(state.run, {}))
        attributes = {
            telemetry.INVOCATION_ID: request.id,
            telemetry.FUNCTION: action.function,
            "stoker.workflow": state.spec.name,
            "stoker.workflow.run": state.run,
            "stoker.workflow.step": action.event.step,
        }
        with tracer.start_as_current_span(f"workflow step {action.event.step}", context=parent, attributes=attributes):
            return Out(self.topics.invocation, request, action.function)  # the step's span is the request's parent

    async def _finish(self, state: plan.RunState, action: plan.FinishRun) -> list[Out]:
        """The run's end and its result: written together, so the run ends exactly once."""
        result = InvocationCompleted(
            id=state.run,
            function=state.spec.name,
            status=action.status,
            output=action.output,
            error=action.error,
            timings_ms=Timings(total=float(max(0, now_ms() - (state.started_ms or now_ms())))),
        )
        state.apply(action.event)
        log.info("run %s of %s finished %s", state.run, state.spec.name, action.status)
        return [self._event(action.event), *await self._results(result, state.reply_to)]

    async def _results(self, result: InvocationCompleted, reply_to: str | None) -> list[Out]:
        outs = []
        for write in result_writes(result, self.topics.result, reply_to):
            # The reply copy goes in the same transaction only when its topic exists (a missing one
            # would fail the whole transaction, and with it the run's end, again and again).
            if write.reply and not await self._topic_exists(write.topic):
                log.warning(
                    "reply topic %s of %s does not exist: result on %s only", write.topic, result.id, self.topics.result
                )
                continue
            outs.append(Out(write.topic, write.record, write.key))
        return outs
