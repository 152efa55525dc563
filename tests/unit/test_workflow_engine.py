"""services.workflow.core.Engine with a fake writer: what one event leads to is one write, with its ack."""

from __future__ import annotations

import asyncio
from typing import Any

from events import (
    InvocationCompleted,
    InvocationRequested,
    Record,
    RunFinished,
    RunStarted,
    StepFinished,
    StepStarted,
    Topics,
)
from services.common.leadership import Ack, Out
from services.workflow import dsl
from services.workflow.core import Engine

TOPICS = Topics("t.")
REPLY = TOPICS.reply("workflow-engine")
SEQUENCE = dsl.load(
    "seq",
    "prewarm: false\nsteps:\n  - {id: a, function: f}\n  - {id: b, function: f, after: [a], input: $.steps.a.output}\n",
    lambda _name: True,
)


class FakeSubmit:
    """Each submission is one transaction: (records, acks)."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[Out], list[Ack]]] = []

    def __call__(self, outs: Any, acks: Any) -> asyncio.Future[None]:
        self.calls.append((list(outs), list(acks)))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    @staticmethod
    def kinds(outs: list[Out]) -> list[tuple[str, str]]:
        return [(o.topic, o.record.type) for o in outs]


def _ack(offset: int, group: str = "stoker-workflow") -> Ack:
    return Ack(group, TOPICS.workflow_invocation, 0, offset)


def _engine(submit: FakeSubmit, existing: set[str] | None = None) -> Engine:
    async def exists(topic: str) -> bool:
        return existing is None or topic in existing

    return Engine(TOPICS, submit, reply_topic=REPLY, topic_exists=exists)


def _ok(request: Record, output: Any) -> InvocationCompleted:
    assert isinstance(request, InvocationRequested)
    return InvocationCompleted(id=request.id, function=request.function, status="ok", output=output)


def test_a_run_from_start_to_end_one_write_per_event() -> None:
    async def scenario() -> None:
        submit = FakeSubmit()
        engine = _engine(submit)
        inv = InvocationRequested(id="r1", function="seq", payload={"x": 1}, reply_to="t.reply.gw")
        await engine.on_invocation(inv, SEQUENCE, _ack(5))
        ((outs, acks),) = submit.calls
        wr, inv_topic = TOPICS.workflow_run, TOPICS.invocation
        assert submit.kinds(outs) == [
            (wr, "workflow.run-started"),
            (wr, "workflow.step-started"),
            (inv_topic, "invocation.requested"),
        ]
        assert acks == [_ack(5)]
        step_a = outs[2].record
        assert isinstance(step_a, InvocationRequested) and step_a.reply_to == REPLY

        await engine.on_result(_ok(step_a, {"y": 2}), Ack("stoker-workflow-steps", REPLY, 0, 1))
        outs, acks = submit.calls[-1]
        assert submit.kinds(outs) == [
            (wr, "workflow.step-finished"),
            (wr, "workflow.step-started"),
            (inv_topic, "invocation.requested"),
        ]
        assert acks == [Ack("stoker-workflow-steps", REPLY, 0, 1)]
        step_b = outs[2].record
        assert isinstance(step_b, InvocationRequested) and step_b.payload == {"y": 2}

        await engine.on_result(_ok(step_b, {"z": 3}), Ack("stoker-workflow-steps", REPLY, 0, 2))
        outs, _ = submit.calls[-1]
        # The run's end, its result and the caller's copy: one transaction.
        assert submit.kinds(outs) == [
            (wr, "workflow.step-finished"),
            (wr, "workflow.run-finished"),
            (TOPICS.result, "invocation.completed"),
            ("t.reply.gw", "invocation.completed"),
        ]
        result = outs[2].record
        assert isinstance(result, InvocationCompleted) and (result.status, result.output) == ("ok", {"b": {"z": 3}})
        engine.close()

    asyncio.run(scenario())


def test_repeats_and_strays_are_only_acked() -> None:
    async def scenario() -> None:
        submit = FakeSubmit()
        engine = _engine(submit)
        inv = InvocationRequested(id="r1", function="seq")
        await engine.on_invocation(inv, SEQUENCE, _ack(1))
        await engine.on_invocation(inv, SEQUENCE, _ack(2))  # redelivered
        stray = InvocationCompleted(id="nobody.a.0.1", function="f", status="ok")
        await engine.on_result(stray, Ack("stoker-workflow-steps", REPLY, 0, 9))
        assert submit.calls[1:] == [([], [_ack(2)]), ([], [Ack("stoker-workflow-steps", REPLY, 0, 9)])]
        engine.close()

    asyncio.run(scenario())


def test_an_unknown_workflow_ends_rejected_and_a_missing_reply_topic_is_left_out() -> None:
    async def scenario() -> None:
        submit = FakeSubmit()
        engine = _engine(submit, existing=set())
        await engine.on_invocation(InvocationRequested(id="r9", function="gone", reply_to="t.reply.x"), None, _ack(3))
        ((outs, acks),) = submit.calls
        assert submit.kinds(outs) == [(TOPICS.result, "invocation.completed")]
        result = outs[0].record
        assert isinstance(result, InvocationCompleted) and result.status == "rejected"
        assert result.error is not None and result.error.kind == "unknown_function"
        assert acks == [_ack(3)]

    asyncio.run(scenario())


def test_a_new_term_resumes_without_asking_for_steps_in_flight_again() -> None:
    async def scenario() -> None:
        first = FakeSubmit()
        engine = _engine(first)
        await engine.on_invocation(InvocationRequested(id="r1", function="seq"), SEQUENCE, _ack(1))
        engine.close()
        history = [o.record for outs, _ in first.calls for o in outs if o.topic == TOPICS.workflow_run]
        assert [type(e) for e in history] == [RunStarted, StepStarted]

        second = FakeSubmit()
        successor = _engine(second)
        for event in history:
            successor.replay(event)
        await asyncio.gather(*await successor.resume())
        assert [outs for outs, _ in second.calls] == [[]]  # nothing new to write: step a is in flight
        (step_a,) = [o.record for outs, _ in first.calls for o in outs if o.topic == TOPICS.invocation]
        await successor.on_result(_ok(step_a, {}), None)
        outs, _ = second.calls[-1]
        assert [type(o.record) for o in outs][:2] == [StepFinished, StepStarted]
        assert RunFinished not in [type(o.record) for o in outs]
        successor.close()

    asyncio.run(scenario())
