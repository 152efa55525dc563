"""The workflow engine: runs workflows as ordinary invocations of their steps, event-sourced on Kafka.

The dispatcher forwards invocations of workflow names to the ``workflow-invocation`` topic; each
starts a run. Its history goes to the ``workflow-run`` topic (key = run id) and
:mod:`services.workflow.plan` decides, from that history and the clock, what to do next
(:class:`services.workflow.core.Engine`). Steps are invocations like any other (through the
dispatcher, in traces and metrics), with their results sent to the engine's reply topic.

Several copies may run (``stoker up --workflow-engines N``): one is active, the others stand by
(:mod:`services.common.leadership`). The active copy writes everything in Kafka transactions
under one transactional id, with the offsets of what it read: a copy that takes over first fences
the old one, then replays the run topic and reads on from the committed offsets, so every run
carries on where it stopped and ends exactly once, and no step is asked for twice.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from events import (
    InvocationCompleted,
    InvocationRequested,
    RunFinished,
    RunStarted,
    StepFinished,
    StepStarted,
    WorkflowSpec,
)
from services.common.admin import ensure_topics
from services.common.broker import dead_letter_for, make_broker
from services.common.leadership import (
    Consumed,
    FencedWriter,
    Leadership,
    Out,
    TermReader,
    run_loops,
)
from services.common.runner import configure_logging, mark_ready, serve
from services.common.telemetry import setup_tracing
from services.common.views import Reader, dead_letters_to
from services.workflow.core import Engine
from services.workflow.settings import WorkflowSettings

log = logging.getLogger("stoker.workflow")
tracer = trace.get_tracer("stoker.workflow")

INVOCATIONS_GROUP = "stoker-workflow"
"""Its committed position on ``workflow-invocation``: past every run whose start is recorded."""
STEPS_GROUP = "stoker-workflow-steps"
"""Its committed position on the reply topic: past every step result whose step-finished is recorded."""
REPLY = "workflow-engine"
"""The engine's reply topic (one for every copy: only the active one reads it)."""
RUN_EVENTS = (RunStarted, StepStarted, StepFinished, RunFinished)


async def run(settings: WorkflowSettings) -> None:
    common = settings.common
    configure_logging(common)
    topics = common.topics
    provider = setup_tracing("workflow", common)
    broker = make_broker(common, "workflow", provider)
    reply_topic = topics.reply(REPLY)
    client_id = f"stoker-{settings.instance_name}"

    # ----- views: every copy keeps them current, so a standby takes over with them ready -----
    reader = Reader(common.bootstrap, "workflow", dead_letters=dead_letters_to(broker, topics.dlq))
    workflows = reader.table(topics.workflow, (WorkflowSpec,))
    # ----- end of views ----------------------------------------------------------------------

    stopping = False
    facts: dict[str, object] = {"instance": settings.instance_name}

    def on_role(role: str) -> None:
        if not stopping:
            mark_ready(common, settings.component, **facts, role=role)

    leadership = Leadership.for_service(
        common.bootstrap,
        topics,
        "workflow",
        instance=settings.instance_name,
        session_timeout_ms=settings.lease_timeout_ms,
        on_role=on_role,
    )

    async def lead(writer: FencedWriter) -> None:
        """One term as the active copy: ``writer`` has fenced the previous one."""
        engine = Engine(topics, writer.submit, reply_topic=reply_topic, topic_exists=writer.topic_exists)
        invocations = TermReader(
            common.bootstrap, topics.workflow_invocation, INVOCATIONS_GROUP, (InvocationRequested,), client_id=client_id
        )
        results = TermReader(common.bootstrap, reply_topic, STEPS_GROUP, (InvocationCompleted,), client_id=client_id)
        try:
            # Everything the previous holder committed, and nothing it did not (it is fenced now).
            history = reader.tail(topics.workflow_run, RUN_EVENTS, engine.replay, replay=True, traced=False)
            await history.start()
            await history.stop()
            open_runs = sum(1 for s in engine.runs.values() if not s.finished)
            log.info("replayed %d runs (%d open)", len(engine.runs), open_runs)
            await workflows.wait_caught_up(timeout_s=10.0)
            await asyncio.gather(*await engine.resume())
            await invocations.start()
            await results.start()

            async def lookup(name: str) -> WorkflowSpec | None:
                spec = workflows.get(name)
                if spec is None and await workflows.wait_caught_up(timeout_s=1.0):
                    spec = workflows.get(name)  # read-your-writes, as the dispatcher does
                return spec

            async def on_invocation(item: Consumed) -> asyncio.Future[None]:
                assert isinstance(item.record, InvocationRequested)
                return await engine.on_invocation(item.record, await lookup(item.record.function), item.ack)

            async def on_result(item: Consumed) -> asyncio.Future[None]:
                assert isinstance(item.record, InvocationCompleted)
                return await engine.on_result(item.record, item.ack)

            async def intake(source: TermReader, handle: Any) -> None:
                # A batch is handled record by record, in order, without waiting for its writes:
                # they are submitted in that order, and the batch waits for them all at its end.
                while True:
                    written = []
                    for item in await source.batch():
                        with tracer.start_as_current_span(
                            f"{item.topic} process",
                            context=item.context(),
                            kind=SpanKind.CONSUMER,
                            attributes={"messaging.system": "kafka", "messaging.consumer.group.name": source.group},
                        ):
                            if item.record is None:
                                written.append(writer.submit([_dead_letter(topics.dlq, item)], [item.ack]))
                            else:
                                written.append(await handle(item))
                    for outcome in await asyncio.gather(*written, return_exceptions=True):
                        if isinstance(outcome, BaseException):
                            raise outcome  # the writer broke: the term ends

            await run_loops([intake(invocations, on_invocation), intake(results, on_result)], writer.failed)
        finally:
            engine.close()
            await invocations.stop()
            await results.stop()

    async def start() -> None:
        await ensure_topics(common.bootstrap, [topics.reply_spec(REPLY)])
        await reader.start()
        await leadership.start()

    async def lead_while_holding() -> None:
        await leadership.run(lead)

    async def stop() -> None:
        nonlocal stopping
        stopping = True
        await leadership.stop()
        await reader.stop()

    await serve(
        settings.component,
        common,
        broker,
        on_start=[start],
        background=[lead_while_holding],
        on_stop=[stop],
        ready_facts={**facts, "role": "standby"},
    )
    provider.shutdown()


def _dead_letter(dlq: str, item: Consumed) -> Out:
    log.warning("dead-lettering %s[%s]@%s: %s", item.topic, item.partition, item.offset, item.reason)
    letter = dead_letter_for(
        topic=item.topic,
        partition=item.partition,
        offset=item.offset,
        key=item.key,
        value=item.value,
        reason=item.reason,
        consumer="workflow",
    )
    return Out(dlq, letter, letter.key)


def main() -> None:
    asyncio.run(run(WorkflowSettings.from_env()))
