"""The workflow engine: runs workflows as ordinary invocations of their steps, event-sourced on Kafka.

A workflow invocation (an ``invocation.requested`` whose function names a workflow) starts a run;
its history goes to the ``workflow-run`` topic (key = run id) and :mod:`services.workflow.plan`
decides, from that history and the clock, what to do next. Steps are invocations like any other
(through the dispatcher, in traces and metrics), with their results sent to the engine's reply
topic. A restarted engine reads the run topic back, asks again for the step invocations in flight
(ids are deterministic: the platform does not run a repeated id twice) and carries on; a run's end
(``run-finished`` plus its result) is written in one Kafka transaction, so it happens exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from aiokafka import AIOKafkaProducer
from faststream.middlewares import AckPolicy
from opentelemetry import propagate, trace

from events import (
    FunctionSpec,
    InvocationCompleted,
    InvocationRequested,
    PrewarmRequested,
    Record,
    RunFinished,
    RunStarted,
    StepFinished,
    StepStarted,
    Timings,
    WorkflowSpec,
    now_ms,
)
from events.codec import encode
from services.common import telemetry
from services.common.admin import ensure_topics
from services.common.broker import make_broker
from services.common.runner import configure_logging, serve
from services.common.settings import CommonSettings
from services.common.table import CompactedTable, TopicTail
from services.common.telemetry import setup_tracing
from services.workflow import plan

log = logging.getLogger("stoker.workflow")
tracer = trace.get_tracer("stoker.workflow")


class Engine:
    """Every run in memory, driven by :func:`plan.next_actions`."""

    def __init__(self, common: CommonSettings, broker: Any, finisher: AIOKafkaProducer | None = None) -> None:
        self.common = common
        self.topics = common.topics
        self.broker = broker
        self.finisher = finisher or self.new_finisher()
        self.reply_topic = self.topics.reply("workflow-engine")
        self.runs: dict[str, plan.RunState] = {}
        self.started: dict[str, StepStarted] = {}
        """Every step attempt by invocation id (to route results and re-ask after a restart)."""
        self.traces: dict[str, dict[str, str]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._finishing = asyncio.Lock()

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

    async def resume(self) -> None:
        """After the replay: ask again for the attempts in flight, then drive every open run."""
        for run, state in list(self.runs.items()):
            if state.finished:
                continue
            for step, _item, unit in state.running():
                started = self.started.get(unit.invocation)
                if started is not None:
                    await self._request(
                        state, step.spec.function, started, unit.started_ms + int(step.spec.timeout_s * 1000)
                    )
            log.info("resuming run %s of %s", run, state.spec.name)
            await self.drive(run)

    # ----- events in ----------------------------------------------------------------------------

    async def on_invocation(self, inv: InvocationRequested, spec: WorkflowSpec) -> None:
        if inv.id in self.runs:
            return  # a redelivered request: the run exists already
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
        await self._record(started)
        self.runs[inv.id] = plan.RunState.start(started)
        self.traces[inv.id] = carrier
        await self.drive(inv.id)

    async def on_result(self, result: InvocationCompleted) -> None:
        started = self.started.get(result.id)
        state = self.runs.get(started.run) if started else None
        if state is None or started is None:
            return
        async with self._lock(started.run):
            event = state.result(result, now_ms())
            if event is None:
                return  # not current (a late result of an attempt already given up)
            await self._record(event)
            state.apply(event)
        await self.drive(started.run)

    # ----- driving --------------------------------------------------------------------------------

    def _lock(self, run: str) -> asyncio.Lock:
        return self._locks.setdefault(run, asyncio.Lock())

    async def drive(self, run: str) -> None:
        state = self.runs[run]
        async with self._lock(run):
            while not state.finished:
                actions = plan.next_actions(state, now_ms())
                if not actions:
                    break
                progressed = False
                for action in actions:
                    if isinstance(action, plan.FinishRun):
                        await self._finish(state, action)
                        progressed = True
                        break
                    if action.event is not None:
                        await self._record(action.event)
                        progressed = state.apply(action.event) or progressed
                    if isinstance(action, plan.StartStep):
                        self.started[action.invocation_id] = action.event
                        await self._start(state, action)
                    elif isinstance(action, plan.Prewarm):
                        await self.broker.publish(
                            PrewarmRequested(function=action.function, count=action.count, reason=action.reason),
                            self.topics.prewarm,
                            key=action.function.encode(),
                        )
                if not progressed:
                    break
            self._arm(run)

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
            self._timers[run] = loop.call_later(delay, lambda: loop.create_task(self.drive(run)))

    async def _start(self, state: plan.RunState, action: plan.StartStep) -> None:
        await self._request(state, action.function, action.event, action.deadline_ms, action.request(self.reply_topic))

    async def _request(
        self,
        state: plan.RunState,
        function: str,
        started: StepStarted,
        deadline_ms: int | None,
        request: InvocationRequested | None = None,
    ) -> None:
        request = request or InvocationRequested(
            id=started.invocation,
            function=function,
            payload=started.input,
            reply_to=self.reply_topic,
            deadline_ms=deadline_ms,
            requested_ms=started.at_ms,
        )
        parent = propagate.extract(self.traces.get(state.run, {}))
        attributes = {
            telemetry.INVOCATION_ID: request.id,
            telemetry.FUNCTION: function,
            "stoker.workflow": state.spec.name,
            "stoker.workflow.run": state.run,
            "stoker.workflow.step": started.step,
        }
        with tracer.start_as_current_span(f"workflow step {started.step}", context=parent, attributes=attributes):
            await self.broker.publish(request, self.topics.invocation, key=function.encode())

    def new_finisher(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self.common.bootstrap,
            enable_idempotence=True,
            acks="all",
            # One engine per platform: a restarted one fences (and aborts) its predecessor's open transaction.
            transactional_id=f"stoker-workflow-{self.topics.prefix}",
            transaction_timeout_ms=60_000,
            request_timeout_ms=10_000,
        )

    async def restart_finisher(self) -> None:
        try:
            await self.finisher.stop()
        except Exception:  # noqa: BLE001 - it is being replaced because it broke
            pass
        self.finisher = self.new_finisher()
        await self.finisher.start()

    async def _record(self, event: RunStarted | StepStarted | StepFinished | RunFinished) -> None:
        await self.broker.publish(event, self.topics.workflow_run, key=event.run.encode())

    async def _finish(self, state: plan.RunState, action: plan.FinishRun) -> None:
        """The run's end and its result, in one transaction: exactly once, even across a crash."""
        result = InvocationCompleted(
            id=state.run,
            function=state.spec.name,
            status=action.status,
            output=action.output,
            error=action.error,
            timings_ms=Timings(total=float(max(0, now_ms() - (state.started_ms or now_ms())))),
        )
        # One producer, one transaction at a time: runs that end together take turns.
        async with self._finishing:
            for attempt in range(1, 4):
                try:
                    async with self.finisher.transaction():
                        await self.finisher.send(self.topics.workflow_run, encode(action.event), key=state.run.encode())
                        await self.finisher.send(self.topics.result, encode(result), key=state.run.encode())
                    break
                except Exception as exc:  # noqa: BLE001 - a fenced or failed producer is replaced, not retried
                    # Nothing of an aborted transaction is visible (readers read committed): start a
                    # new transactional producer (which fences the old one) and write the end again.
                    log.warning("finishing run %s failed (attempt %d): %r; new producer", state.run, attempt, exc)
                    await self.restart_finisher()
                    if attempt == 3:
                        raise
        state.apply(action.event)
        if state.reply_to:
            # The copy for the caller's reply topic is outside the transaction: exactly-once is the
            # result topic's promise; a reply topic's reader drops a repeated id (after a crash).
            await self.broker.publish(result, state.reply_to, key=state.run.encode())
        log.info("run %s of %s finished %s", state.run, state.spec.name, action.status)


async def run(common: CommonSettings) -> None:
    configure_logging(common)
    topics = common.topics
    provider = setup_tracing("workflow", common)
    broker = make_broker(common, "workflow", provider)
    engine = Engine(common, broker)
    workflows: CompactedTable[WorkflowSpec] = CompactedTable(common.bootstrap, topics.workflow, (WorkflowSpec,))
    functions: CompactedTable[FunctionSpec] = CompactedTable(common.bootstrap, topics.function, (FunctionSpec,))

    @broker.subscriber(
        topics.invocation,
        group_id="stoker-workflow",
        auto_offset_reset="latest",  # a new engine: no workflow is in the topic's past
        ack_policy=AckPolicy.NACK_ON_ERROR,
        fetch_max_wait_ms=100,
    )
    async def on_invocation(inv: InvocationRequested) -> None:
        spec = workflows.get(inv.function)
        if spec is None and functions.get(inv.function) is None:
            await workflows.wait_caught_up(timeout_s=1.0)  # read-your-writes, as the dispatcher does
            spec = workflows.get(inv.function)
        if spec is not None:
            await engine.on_invocation(inv, spec)

    # Step results are committed once their step-finished is written: none is lost to a crash.
    @broker.subscriber(
        engine.reply_topic,
        group_id="stoker-workflow-steps",
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.NACK_ON_ERROR,
        fetch_max_wait_ms=100,
    )
    async def on_step_result(result: InvocationCompleted) -> None:
        await engine.on_result(result)

    async def start() -> None:
        await ensure_topics(common.bootstrap, [topics.reply_spec("workflow-engine")])
        await engine.finisher.start()
        await workflows.start()
        await functions.start()
        history = TopicTail(
            common.bootstrap, topics.workflow_run, (RunStarted, StepStarted, StepFinished, RunFinished), engine.replay
        )
        await history.start(replay=True)
        await history.stop()
        open_runs = sum(1 for s in engine.runs.values() if not s.finished)
        log.info("replayed %d runs (%d open)", len(engine.runs), open_runs)

    async def resume() -> None:
        await engine.resume()
        await asyncio.Event().wait()

    async def stop() -> None:
        await workflows.stop()
        await functions.stop()
        await engine.finisher.stop()

    await serve("workflow", common, broker, on_start=[start], background=[resume], on_stop=[stop])
    provider.shutdown()


def main() -> None:
    asyncio.run(run(CommonSettings.from_env(os.environ)))
