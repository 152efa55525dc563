"""Unit tests of services.workflow.plan: the run state machine, driven by a tiny in-memory engine."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from events.invocation import ErrorInfo, InvocationCompleted
from events.workflow import RunEvent, RunFinished, RunStarted, StepFinished, StepSpec, StepStarted, WorkflowSpec
from services.workflow.dsl import load
from services.workflow.plan import (
    MAX_MAP_ITEMS,
    Action,
    EndStep,
    FinishRun,
    Prewarm,
    RetryAt,
    RunState,
    SkipStep,
    StartStep,
    backoff_ms,
    invocation_id,
    next_actions,
    replay,
    spec_problem,
)

T0 = 1_700_000_000_000
SEC = 1000


def workflow(text: str, name: str = "wf") -> WorkflowSpec:
    return load(name, textwrap.dedent(text), lambda function: True)


class Engine:
    """What the engine service does, minus Kafka: record each action's event, apply it, keep the log."""

    def __init__(self, spec: WorkflowSpec, data: Any = None, run: str = "run-1", deadline_ms: int | None = None):
        self.now = T0
        started = RunStarted(run=run, workflow=spec, input=data, deadline_ms=deadline_ms, at_ms=T0)
        self.events: list[RunEvent] = [started]
        self.state = RunState.start(started)
        self.actions: list[Action] = []

    def tick(self, at: int | None = None) -> list[Action]:
        if at is not None:
            self.now = at
        before = self.state.copy()
        actions = next_actions(self.state, self.now)
        assert self.state == before, "next_actions must not change the state"
        for action in actions:
            if action.event is not None:
                self.record(action.event)
        self.actions.extend(actions)
        return actions

    def record(self, event: RunEvent) -> None:
        self.events.append(event)
        assert self.state.apply(event), event

    def complete(self, step: str, item: int | None = None, status: str = "ok", output: Any = None, **kw: Any) -> bool:
        """Deliver the result of the current attempt of a step (item); whether it was current."""
        unit = self.state.steps[step].units[item]
        return self.result(unit.invocation, status, output, **kw)

    def result(self, invocation: str, status: str = "ok", output: Any = None, error: ErrorInfo | None = None) -> bool:
        if status != "ok" and error is None:
            error = ErrorInfo(kind="ValueError" if status == "error" else status, message="boom")
        completed = InvocationCompleted(
            id=invocation,
            function="f",
            status=status,  # type: ignore[arg-type]
            output=output,
            error=error,
        )
        finished = self.state.result(completed, self.now)
        if finished is None:
            return False
        self.record(finished)
        return True

    def running(self) -> list[tuple[str, int | None]]:
        return sorted(((step.spec.id, item) for step, item, _ in self.state.running()), key=str)


def starts(actions: list[Action]) -> list[tuple[str, int | None, int]]:
    return [(a.step, a.item, a.attempt) for a in actions if isinstance(a, StartStep)]


def only(actions: list[Action], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def finish(actions: list[Action]) -> FinishRun:
    found = only(actions, FinishRun)
    assert len(found) == 1, actions
    return found[0]


SEQUENCE = """\
steps:
  - {id: a, function: fa, input: {x: $.input.x}}
  - {id: b, function: fb, after: [a], input: $.steps.a.output}
  - {id: c, function: fc, after: [b], input: {b: $.steps.b.output, a: $.steps.a.output}}
"""

DIAMOND = """\
steps:
  - {id: a, function: fa}
  - {id: b, function: fb, after: [a], input: $.steps.a.output.left}
  - {id: c, function: fc, after: [a], input: $.steps.a.output.right}
  - {id: d, function: fd, after: [b, c], input: [$.steps.b.output, $.steps.c.output]}
"""

MAP = """\
steps:
  - {id: list, function: fl}
  - id: each
    function: fe
    after: [list]
    map: $.steps.list.output
    max_parallel: 3
    input: {value: $.item, position: $.index, all: $.input.tag}
    retries: 1
    backoff_s: 1
  - {id: sum, function: fs, after: [each], input: $.steps.each.output}
"""


# -- sequence, fan-out and join, output ----------------------------------------------------


def test_a_sequence_runs_step_by_step_and_passes_outputs_along() -> None:
    engine = Engine(workflow(SEQUENCE), {"x": 1})
    first = engine.tick()
    assert starts(first) == [("a", None, 1)]
    start = only(first, StartStep)[0]
    assert start.input == {"x": 1} and start.function == "fa" and start.invocation_id == "run-1.a.0.1"
    assert start.timeout_s == 30.0 and start.deadline_ms == T0 + 30 * SEC
    assert start.event == StepStarted(run="run-1", step="a", invocation="run-1.a.0.1", input={"x": 1}, at_ms=T0)
    assert engine.tick() == []  # nothing new until a result comes

    engine.now += 100
    assert engine.complete("a", output={"y": 2})
    second = engine.tick()
    assert starts(second) == [("b", None, 1)]
    assert only(second, StartStep)[0].input == {"y": 2}
    engine.complete("b", output="B")
    assert starts(engine.tick()) == [("c", None, 1)]
    assert engine.state.steps["c"].units[None].status == "running"
    engine.complete("c", output="C")
    done = finish(engine.tick())
    assert (done.status, done.output, done.error) == ("ok", {"c": "C"}, None)
    assert done.event == RunFinished(run="run-1", workflow="wf", status="ok", output={"c": "C"}, at_ms=engine.now)
    assert engine.state.finished and engine.state.status == "ok"
    assert next_actions(engine.state, engine.now) == []


def test_fan_out_runs_in_parallel_and_the_join_waits_for_all() -> None:
    engine = Engine(workflow(DIAMOND))
    engine.tick()
    engine.complete("a", output={"left": 1, "right": 2})
    fan_out = engine.tick()
    assert starts(fan_out) == [("b", None, 1), ("c", None, 1)]
    assert [a.input for a in only(fan_out, StartStep)] == [1, 2]
    engine.complete("c", output="C")
    assert starts(engine.tick()) == []
    engine.complete("b", output="B")
    join = engine.tick()
    assert starts(join) == [("d", None, 1)]
    assert only(join, StartStep)[0].input == ["B", "C"]
    engine.complete("d", output="D")
    assert finish(engine.tick()).output == {"d": "D"}


def test_the_output_template_is_rendered_at_the_end() -> None:
    spec = workflow(
        SEQUENCE + "output: {first: $.steps.a.output, all: [$.steps.b.output, $.steps.c.status], note: $$x}\n"
    )
    engine = Engine(spec)
    for step in "abc":
        engine.tick()
        engine.complete(step, output=step.upper())
    assert finish(engine.tick()).output == {"first": "A", "all": ["B", "ok"], "note": "$x"}


def test_the_default_output_has_every_step_nothing_runs_after() -> None:
    spec = workflow(
        """\
        steps:
          - {id: a, function: f}
          - {id: b, function: f, after: [a]}
          - {id: c, function: f, after: [a]}
        """
    )
    engine = Engine(spec)
    engine.tick()
    engine.complete("a", output=1)
    engine.tick()
    engine.complete("b", output=2)
    engine.complete("c", output=3)
    assert finish(engine.tick()).output == {"b": 2, "c": 3}


# -- conditions and skipping ---------------------------------------------------------------

CONDITIONAL = """\
steps:
  - {id: check, function: f}
  - {id: notify, function: mail, after: [check], when: $.steps.check.output.in_stock == true}
  - {id: log, function: f, after: [notify]}
  - {id: other, function: f, after: [check]}
output: {notified: $.steps.notify.status, log: $.steps.log.output, other: $.steps.other.output}
"""


def test_a_false_condition_skips_the_step_and_the_steps_after_it() -> None:
    engine = Engine(workflow(CONDITIONAL))
    engine.tick()
    engine.complete("check", output={"in_stock": False})
    actions = engine.tick()
    skips = only(actions, SkipStep)
    assert [(s.step, s.reason) for s in skips] == [
        ("notify", "`when` is false: $.steps.check.output.in_stock == true"),
        ("log", "`notify` was skipped"),
    ]
    assert skips[0].event.status == "skipped" and skips[0].event.error == ErrorInfo(
        kind="skipped", message=skips[0].reason
    )
    assert starts(actions) == [("other", None, 1)]
    assert engine.state.steps["log"].status == "skipped"
    engine.complete("other", output="O")
    assert finish(engine.tick()).output == {"notified": "skipped", "log": None, "other": "O"}


def test_a_true_condition_runs_the_step() -> None:
    engine = Engine(workflow(CONDITIONAL))
    engine.tick()
    engine.complete("check", output={"in_stock": True})
    assert starts(engine.tick()) == [("notify", None, 1), ("other", None, 1)]


@pytest.mark.parametrize(
    ("when", "runs"), [("$.input.flag", False), ("not $.input.flag", True), ("$.input.n > 2", True)]
)
def test_a_condition_on_a_first_step_uses_the_input(when: str, runs: bool) -> None:
    engine = Engine(workflow(f"steps:\n  - id: a\n    function: f\n    when: '{when}'\n"), {"n": 3})
    actions = engine.tick()
    if runs:
        assert starts(actions) == [("a", None, 1)]
    else:
        assert [a.step for a in only(actions, SkipStep)] == ["a"]
        assert finish(actions).output == {"a": None}  # every step skipped: the run is still ok


# -- map -----------------------------------------------------------------------------------


def test_a_map_respects_max_parallel_and_keeps_item_order() -> None:
    engine = Engine(workflow(MAP), {"tag": "t"})
    engine.tick()
    engine.complete("list", output=[10, 11, 12, 13, 14])
    first = engine.tick()
    assert starts(first) == [("each", 0, 1), ("each", 1, 1), ("each", 2, 1)]
    assert [a.input for a in only(first, StartStep)] == [
        {"value": 10, "position": 0, "all": "t"},
        {"value": 11, "position": 1, "all": "t"},
        {"value": 12, "position": 2, "all": "t"},
    ]
    assert [a.invocation_id for a in only(first, StartStep)] == ["run-1.each.0.1", "run-1.each.1.1", "run-1.each.2.1"]
    engine.complete("each", 1, output="r11")
    assert starts(engine.tick()) == [("each", 3, 1)]
    engine.complete("each", 3, output="r13")
    engine.complete("each", 2, output="r12")
    assert starts(engine.tick()) == [("each", 4, 1)]
    assert len(engine.running()) == 2
    engine.complete("each", 4, output="r14")
    assert starts(engine.tick()) == []
    engine.complete("each", 0, output="r10")
    assert starts(engine.tick()) == [("sum", None, 1)]
    assert engine.state.steps["each"].output == ["r10", "r11", "r12", "r13", "r14"]
    assert engine.events[-1].input == ["r10", "r11", "r12", "r13", "r14"]  # type: ignore[union-attr]


def test_never_more_than_max_parallel_items_run() -> None:
    engine = Engine(workflow(MAP))
    engine.tick()
    engine.complete("list", output=list(range(20)))
    engine.tick()
    peak = 0
    while not engine.state.finished:
        running = engine.running()
        peak = max(peak, len([r for r in running if r[0] == "each"]))
        assert peak <= 3
        step, item = running[-1]
        engine.complete(step, item, output=item)
        engine.tick()
    assert peak == 3
    assert engine.state.steps["each"].output == list(range(20))


def test_a_map_over_an_empty_list_finishes_ok_with_an_empty_list() -> None:
    engine = Engine(workflow(MAP))
    engine.tick()
    engine.complete("list", output=[])
    actions = engine.tick()
    ends = only(actions, EndStep)
    assert [(e.step, e.status, e.event.output) for e in ends] == [("each", "ok", [])]
    assert starts(actions) == [("sum", None, 1)]
    assert only(actions, StartStep)[0].input == []


@pytest.mark.parametrize(
    ("output", "kind"), [(None, "map_not_a_list"), ({"a": 1}, "map_not_a_list"), ("abc", "map_not_a_list")]
)
def test_a_map_over_something_else_fails_the_run(output: Any, kind: str) -> None:
    engine = Engine(workflow(MAP))
    engine.tick()
    engine.complete("list", output=output)
    done = finish(engine.tick())
    assert done.status == "error"
    assert done.error is not None and done.error.kind == f"step each failed: {kind}"
    assert "not a list" in done.error.message


def test_a_map_over_too_many_items_fails_the_run() -> None:
    engine = Engine(workflow(MAP))
    engine.tick()
    engine.complete("list", output=list(range(MAX_MAP_ITEMS + 1)))
    done = finish(engine.tick())
    assert done.error is not None and done.error.kind == "step each failed: map_too_large"


# -- retries, backoff, timeouts ------------------------------------------------------------

RETRY = """\
steps:
  - id: a
    function: f
    retries: 2
    backoff_s: 0.2
    timeout_s: 5
"""


def test_retries_back_off_exponentially_then_fail_the_run() -> None:
    engine = Engine(workflow(RETRY), {"same": "input"})
    engine.tick()
    engine.now = T0 + 1000
    engine.complete("a", status="error")
    actions = engine.tick()
    assert actions == [RetryAt("a", None, 2, T0 + 1200)]
    assert engine.state.next_wakeup(engine.now) == T0 + 1200
    assert engine.tick(T0 + 1199) == [RetryAt("a", None, 2, T0 + 1200)]
    retry = engine.tick(T0 + 1200)
    assert starts(retry) == [("a", None, 2)]
    assert only(retry, StartStep)[0].invocation_id == "run-1.a.0.2"
    assert only(retry, StartStep)[0].input == {"same": "input"}

    engine.now = T0 + 2000
    engine.complete("a", status="rejected")
    assert engine.tick() == [RetryAt("a", None, 3, T0 + 2400)]  # 0.2s * 2
    assert starts(engine.tick(T0 + 2400)) == [("a", None, 3)]

    engine.now = T0 + 3000
    engine.complete("a", status="error", error=ErrorInfo(kind="KeyError", message="'sku'", traceback="tb"))
    done = finish(engine.tick())
    assert done.status == "error"
    assert done.error == ErrorInfo(kind="step a failed: KeyError", message="'sku'", traceback="tb")
    assert engine.state.failed_step == "a"


def test_backoff_doubles_per_failed_attempt() -> None:
    spec = workflow(RETRY).steps[0]
    assert [backoff_ms(spec, attempt) for attempt in (1, 2, 3, 4)] == [200, 400, 800, 1600]


@pytest.mark.parametrize("status", ["error", "timeout", "rejected", "lost"])
def test_every_failed_status_is_retried(status: str) -> None:
    engine = Engine(workflow(RETRY))
    engine.tick()
    engine.complete("a", status=status)
    assert only(engine.tick(), RetryAt)
    error = engine.state.steps["a"].units[None].error
    assert error is not None and error.kind == ("ValueError" if status == "error" else status)


def test_a_missing_error_is_named_after_the_status() -> None:
    engine = Engine(workflow("steps:\n  - {id: a, function: f}\n"))
    engine.tick()
    engine.record(StepFinished(run="run-1", step="a", attempt=1, status="lost", at_ms=T0))
    done = finish(engine.tick())
    assert done.error is not None and done.error.kind == "step a failed: lost"


def test_an_attempt_without_a_result_times_out_and_is_retried() -> None:
    engine = Engine(workflow(RETRY))
    engine.tick()
    late = engine.state.steps["a"].units[None].invocation
    assert engine.state.next_wakeup(T0) == T0 + 5000
    assert engine.tick(T0 + 4999) == []
    actions = engine.tick(T0 + 5000)
    ends = only(actions, EndStep)
    assert [(e.step, e.attempt, e.status) for e in ends] == [("a", 1, "timeout")]
    assert ends[0].event.error == ErrorInfo(kind="timeout", message="no result within 5s")
    assert only(actions, RetryAt) == [RetryAt("a", None, 2, T0 + 5200)]
    assert not engine.result(late, output="too late")  # the timed-out attempt's result is ignored
    assert starts(engine.tick(T0 + 5200)) == [("a", None, 2)]
    assert not engine.result(late, output="still too late")
    assert engine.complete("a", output="ok now")
    assert finish(engine.tick()).output == {"a": "ok now"}


def test_a_timeout_without_retries_fails_the_run_naming_the_step() -> None:
    engine = Engine(workflow("steps:\n  - {id: slow, function: f, timeout_s: 2}\n"))
    engine.tick()
    done = finish(engine.tick(T0 + 2000))
    assert done.error is not None and done.error.kind == "step slow failed: timeout"


def test_map_items_retry_on_their_own() -> None:
    engine = Engine(workflow(MAP))
    engine.tick()
    engine.complete("list", output=["a", "b"])
    engine.tick()
    engine.now = T0 + 100
    engine.complete("each", 0, status="error")
    assert only(engine.tick(), RetryAt) == [RetryAt("each", 0, 2, T0 + 1100)]
    engine.complete("each", 1, output="B")
    assert starts(engine.tick(T0 + 1100)) == [("each", 0, 2)]
    assert only(engine.actions, StartStep)[-1].invocation_id == "run-1.each.0.2"
    engine.complete("each", 0, output="A")
    assert starts(engine.tick()) == [("sum", None, 1)]
    assert engine.state.steps["each"].output == ["A", "B"]


def test_a_retry_waiting_for_its_time_does_not_hold_a_parallel_slot_but_goes_first_when_due() -> None:
    engine = Engine(workflow(MAP))
    engine.tick()
    engine.complete("list", output=list(range(5)))
    engine.tick()
    engine.complete("each", 0, status="error")
    assert starts(engine.tick()) == [("each", 3, 1)]
    engine.now = T0 + 1000
    engine.complete("each", 1, output=1)
    assert starts(engine.tick()) == [("each", 0, 2)]


def test_the_step_timeout_bounds_the_request_deadline() -> None:
    engine = Engine(workflow("steps:\n  - {id: a, function: f, timeout_s: 2.5}\n"), deadline_ms=T0 + 2000)
    start = only(engine.tick(), StartStep)[0]
    assert start.deadline_ms == T0 + 2000
    request = start.request(reply_to="stoker.workflow-results")
    assert (request.id, request.function, request.payload) == ("run-1.a.0.1", "f", None)
    assert (request.deadline_ms, request.reply_to, request.requested_ms) == (T0 + 2000, "stoker.workflow-results", T0)
    engine = Engine(workflow("steps:\n  - {id: a, function: f, timeout_s: 2.5}\n"))
    assert only(engine.tick(), StartStep)[0].deadline_ms == T0 + 2500


# -- failure fails fast --------------------------------------------------------------------


def test_a_failed_step_cancels_the_running_ones_and_starts_nothing_more() -> None:
    engine = Engine(workflow(DIAMOND))
    engine.tick()
    engine.complete("a", output={})
    engine.tick()
    c_invocation = engine.state.steps["c"].units[None].invocation
    engine.now = T0 + 50
    engine.complete("b", status="error", error=ErrorInfo(kind="ZeroDivisionError", message="division by zero"))
    actions = engine.tick()
    assert starts(actions) == []
    cancelled = only(actions, EndStep)
    assert [(e.step, e.status, e.event.status) for e in cancelled] == [("c", "cancelled", "cancelled")]
    done = finish(actions)
    assert done.status == "error"
    assert done.error == ErrorInfo(kind="step b failed: ZeroDivisionError", message="division by zero")
    assert actions[-1] is done  # the cancellations are recorded before the run's end
    assert not engine.result(c_invocation, output="ignored")
    assert engine.state.steps["c"].units[None].status == "cancelled"
    assert engine.tick() == []
    assert engine.state.next_wakeup(engine.now) is None


def test_a_failed_map_item_fails_the_run_and_names_the_item() -> None:
    engine = Engine(workflow(MAP.replace("retries: 1", "retries: 0")))
    engine.tick()
    engine.complete("list", output=[1, 2, 3, 4])
    engine.tick()
    engine.complete("each", 1, status="error", error=ErrorInfo(kind="ValueError", message="bad item"))
    actions = engine.tick()
    assert sorted((e.item, e.status) for e in only(actions, EndStep)) == [(0, "cancelled"), (2, "cancelled")]
    done = finish(actions)
    assert done.error == ErrorInfo(kind="step each failed: ValueError", message="item 1: bad item")


def test_the_run_deadline_finishes_it_as_timeout() -> None:
    engine = Engine(workflow(DIAMOND), deadline_ms=T0 + 10 * SEC)
    engine.tick()
    assert engine.state.next_wakeup(T0) == T0 + 10 * SEC
    done = finish(engine.tick(T0 + 10 * SEC))
    assert done.status == "timeout"
    assert done.error == ErrorInfo(kind="deadline", message="the run's deadline passed while a ran")
    assert engine.state.status == "timeout"


def test_events_after_the_run_finished_are_ignored() -> None:
    engine = Engine(workflow(DIAMOND))
    engine.tick()
    engine.complete("a", status="error")
    engine.tick()
    assert engine.state.finished
    before = engine.state.copy()
    stray: list[RunEvent] = [
        StepStarted(run="run-1", step="b", invocation="x", at_ms=T0),
        StepFinished(run="run-1", step="a", attempt=1, status="ok", at_ms=T0),
        RunFinished(run="run-1", workflow="wf", status="ok", at_ms=T0),
    ]
    assert [engine.state.apply(event) for event in stray] == [False, False, False]
    assert engine.state == before


# -- prewarm -------------------------------------------------------------------------------


def test_prewarm_the_next_wave_when_its_dependencies_start() -> None:
    engine = Engine(workflow(SEQUENCE))
    first = engine.tick()
    assert [(p.step, p.function, p.count) for p in only(first, Prewarm)] == [("b", "fb", 1)]
    assert "step b starts after a" in only(first, Prewarm)[0].reason
    engine.complete("a", output={})
    assert [p.step for p in only(engine.tick(), Prewarm)] == ["c"]
    engine.complete("b", output={})
    assert only(engine.tick(), Prewarm) == []


def test_a_join_is_prewarmed_once_all_its_branches_started() -> None:
    engine = Engine(workflow(DIAMOND))
    assert [p.step for p in only(engine.tick(), Prewarm)] == ["b", "c"]
    engine.complete("a", output={})
    assert [p.step for p in only(engine.tick(), Prewarm)] == ["d"]
    engine.complete("b", output=1)
    assert only(engine.tick(), Prewarm) == []  # d was prewarmed already


def test_prewarm_is_not_repeated_on_later_calls_or_after_a_replay() -> None:
    engine = Engine(workflow(SEQUENCE))
    engine.tick()
    assert engine.tick() == []
    assert next_actions(replay(engine.events), engine.now) == []


def test_a_mapped_step_is_prewarmed_for_its_parallelism_or_its_known_length() -> None:
    spec = workflow(
        """\
        steps:
          - {id: a, function: f}
          - {id: many, function: g, after: [a], map: $.steps.a.output, max_parallel: 8}
          - {id: few, function: h, after: [a], map: $.input.list, max_parallel: 8}
          - {id: none, function: k, after: [a], map: $.input.empty}
          - {id: huge, function: k, after: [a], map: $.input.list, max_parallel: 500}
        """
    )
    engine = Engine(spec, {"list": [1, 2], "empty": []})
    assert [(p.step, p.count) for p in only(engine.tick(), Prewarm)] == [("many", 8), ("few", 2), ("huge", 2)]
    engine = Engine(spec, {"list": list(range(100)), "empty": []})
    assert [(p.step, p.count) for p in only(engine.tick(), Prewarm)] == [("many", 8), ("few", 8), ("huge", 64)]


def test_a_step_known_to_be_skipped_is_not_prewarmed() -> None:
    spec = workflow(
        """\
        steps:
          - {id: a, function: f}
          - {id: b, function: g, after: [a], when: $.input.go}
          - {id: c, function: h, after: [a], when: $.steps.a.output.go}
        """
    )
    assert [p.step for p in only(Engine(spec, {"go": False}).tick(), Prewarm)] == ["c"]
    assert [p.step for p in only(Engine(spec, {"go": True}).tick(), Prewarm)] == ["b", "c"]


def test_prewarm_false_turns_it_off() -> None:
    engine = Engine(workflow("prewarm: false\n" + SEQUENCE))
    assert only(engine.tick(), Prewarm) == []


# -- event sourcing: replay, idempotence, determinism --------------------------------------


def scenario(run: str = "run-1") -> Engine:
    """A run that uses everything: map with retries and parallelism, a timeout, a skip, a join."""
    spec = workflow(
        """\
        steps:
          - {id: list, function: fl, retries: 1, backoff_s: 0.5, timeout_s: 3}
          - id: each
            function: fe
            after: [list]
            map: $.steps.list.output
            max_parallel: 2
            input: {v: $.item}
            retries: 2
            backoff_s: 1
          - {id: maybe, function: fm, after: [list], when: $.input.go}
          - {id: later, function: fm, after: [maybe]}
          - {id: sum, function: fs, after: [each], input: $.steps.each.output}
        """
    )
    engine = Engine(spec, {"go": False}, run=run)
    engine.tick()
    engine.tick(T0 + 3000)  # list times out: retry at +3.5s
    engine.tick(T0 + 3500)
    engine.complete("list", output=["x", "y", "z"])
    engine.tick()
    engine.now = T0 + 4000
    engine.complete("each", 0, status="error")
    engine.tick()
    engine.complete("each", 1, output="Y")
    engine.tick()
    engine.tick(T0 + 5000)
    engine.complete("each", 2, output="Z")
    engine.complete("each", 0, output="X")
    engine.tick()
    engine.complete("sum", output="XYZ")
    engine.tick()
    assert engine.state.status == "ok"
    return engine


def failing_scenario() -> Engine:
    """A run that fails: a map item fails for good while other items and a branch run."""
    spec = workflow(
        """\
        steps:
          - {id: a, function: f}
          - {id: each, function: g, after: [a], map: $.steps.a.output, max_parallel: 3, retries: 1, backoff_s: 0}
          - {id: side, function: h, after: [a]}
          - {id: end, function: k, after: [each, side]}
        """
    )
    engine = Engine(spec)
    engine.tick()
    engine.complete("a", output=[1, 2, 3, 4])
    engine.tick()
    engine.complete("each", 0, output="ok")
    engine.complete("each", 1, status="timeout")
    engine.tick(T0 + 10)
    engine.complete("each", 1, status="error")
    engine.tick(T0 + 20)
    assert engine.state.status == "error"
    return engine


def test_the_scenario_went_as_planned() -> None:
    engine = scenario()
    started = [(e.step, e.item, e.attempt) for e in engine.events if isinstance(e, StepStarted)]
    assert started == [
        ("list", None, 1),
        ("list", None, 2),
        ("each", 0, 1),
        ("each", 1, 1),
        ("each", 2, 1),
        ("each", 0, 2),
        ("sum", None, 1),
    ]
    assert engine.state.output == {"later": None, "sum": "XYZ"}
    assert engine.state.steps["maybe"].reason == "`when` is false: $.input.go"


@pytest.mark.parametrize("make", [scenario, failing_scenario])
def test_replaying_the_events_rebuilds_the_state_exactly(make: Any) -> None:
    engine = make()
    for cut in range(1, len(engine.events) + 1):
        prefix = engine.events[:cut]
        rebuilt = replay(prefix)
        twice = RunState.start(prefix[0])  # type: ignore[arg-type]
        for event in prefix[1:]:
            twice.apply(event)
            assert not twice.apply(event), event  # the same event again changes nothing
        assert twice == rebuilt
        for now in (T0, T0 + 3000, T0 + 3500, T0 + 5000, T0 + 60_000):
            assert next_actions(rebuilt, now) == next_actions(twice, now)
    assert replay(engine.events) == engine.state


@pytest.mark.parametrize("make", [scenario, failing_scenario])
def test_replaying_all_events_twice_in_a_row_changes_nothing(make: Any) -> None:
    engine = make()
    state = replay(engine.events)
    assert not any(state.apply(event) for event in engine.events[1:])
    assert state == engine.state


def test_the_failing_scenario_cancelled_what_ran() -> None:
    engine = failing_scenario()
    cancelled = [(e.step, e.item) for e in engine.events if isinstance(e, StepFinished) and e.status == "cancelled"]
    assert cancelled == [("each", 2), ("each", 3), ("side", None)]
    assert isinstance(engine.events[-1], RunFinished)
    assert engine.events[-1].error == ErrorInfo(kind="step each failed: ValueError", message="item 1: boom")
    assert engine.state.steps["end"].status == "waiting"
    assert not any(isinstance(e, StepStarted) and e.step == "end" for e in engine.events)


def test_runs_are_deterministic_and_invocation_ids_derive_from_the_run() -> None:
    one, two = scenario(), scenario()
    assert one.events[1:] == two.events[1:]
    ids = [a.invocation_id for a in only(one.actions, StartStep)]
    assert ids == [
        "run-1.list.0.1",
        "run-1.list.0.2",
        "run-1.each.0.1",
        "run-1.each.1.1",
        "run-1.each.2.1",
        "run-1.each.0.2",
        "run-1.sum.0.1",
    ]
    other = scenario(run="run-2")
    assert [a.invocation_id for a in only(other.actions, StartStep)][0] == "run-2.list.0.1"


def test_next_actions_is_a_pure_function_of_state_and_time() -> None:
    engine = Engine(workflow(MAP))
    engine.tick()
    engine.complete("list", output=[1, 2, 3, 4])
    assert next_actions(engine.state, T0) == next_actions(engine.state, T0)
    assert starts(next_actions(engine.state, T0)) == [("each", 0, 1), ("each", 1, 1), ("each", 2, 1)]


def test_a_repeated_start_is_not_applied_twice_and_a_stale_attempt_is_ignored() -> None:
    engine = Engine(workflow(RETRY))
    start = only(engine.tick(), StartStep)[0]
    assert not engine.state.apply(start.event)
    engine.complete("a", status="error")
    engine.tick(T0 + 200)
    assert engine.state.steps["a"].units[None].attempt == 2
    assert not engine.state.apply(start.event)  # an older attempt's start
    stale = StepFinished(run="run-1", step="a", attempt=1, status="ok", output="old", at_ms=T0)
    assert not engine.state.apply(stale)
    assert not engine.result("run-1.a.0.1", output="old")
    assert engine.state.steps["a"].units[None].status == "running"


def test_events_of_another_run_or_unknown_steps_are_ignored() -> None:
    engine = Engine(workflow(SEQUENCE))
    engine.tick()
    before = engine.state.copy()
    assert not engine.state.apply(StepFinished(run="other", step="a", status="ok", at_ms=T0))
    assert not engine.state.apply(StepStarted(run="run-1", step="zzz", invocation="x", at_ms=T0))
    assert not engine.state.apply(StepStarted(run="run-1", step="b", item=3, invocation="x", at_ms=T0))
    assert engine.state == before


def test_replay_needs_run_started_first() -> None:
    with pytest.raises(ValueError):
        replay([StepStarted(run="r", step="a", invocation="x")])


def test_invocation_ids() -> None:
    assert invocation_id("r", "step", None, 1) == "r.step.0.1"
    assert invocation_id("r", "step", 0, 1) == "r.step.0.1"
    assert invocation_id("r", "step", 12, 3) == "r.step.12.3"
    long_run = "r" * 200
    long_id = invocation_id(long_run, "step", 7, 2)
    assert len(long_id) <= 200 and long_id.endswith(".step.7.2") and long_id.startswith("wf-")
    assert long_id == invocation_id(long_run, "step", 7, 2)
    assert long_id != invocation_id("s" * 200, "step", 7, 2)


def test_attempt_of_finds_only_current_attempts() -> None:
    engine = Engine(workflow(MAP))
    engine.tick()
    assert engine.state.attempt_of("run-1.list.0.1") == ("list", None, 1)
    assert engine.state.attempt_of("run-1.list.0.2") is None
    assert engine.state.attempt_of("unrelated") is None


# -- definitions that did not come through dsl.load ----------------------------------------


def raw(*steps: StepSpec, output: Any = None) -> WorkflowSpec:
    return WorkflowSpec(name="raw", steps=list(steps), output=output)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (raw(), "the workflow has no steps"),
        (raw(StepSpec(id="a", function="f"), StepSpec(id="a", function="g")), "step ids are not unique"),
        (raw(StepSpec(id="a", function="f", after=["x"])), "step a runs after unknown step x"),
        (
            raw(StepSpec(id="a", function="f", after=["b"]), StepSpec(id="b", function="f", after=["a"])),
            "the steps' `after` have a cycle",
        ),
        (raw(StepSpec(id="a", function="f", input={"x": "$.bad"})), "step a: input: .x: column 2: a path starts"),
        (raw(StepSpec(id="a", function="f", when="1 <")), "step a: when: column 4:"),
        (raw(StepSpec(id="a", function="f", map="$.input[")), "step a: map: column 9:"),
        (raw(StepSpec(id="a", function="f"), output=["$.steps"]), "output: [0]: column 8: name the step"),
    ],
)
def test_a_definition_that_cannot_run_fails_its_runs(spec: WorkflowSpec, problem: str) -> None:
    found = spec_problem(spec)
    assert found is not None and found.startswith(problem), found
    engine = Engine(spec)
    actions = engine.tick()
    assert actions == [finish(actions)]
    assert finish(actions).error == ErrorInfo(kind="invalid_workflow", message=found)


def test_a_valid_definition_has_no_problem() -> None:
    assert spec_problem(workflow(MAP)) is None
    assert spec_problem(raw(StepSpec(id="a", function="f"), StepSpec(id="b", function="f", after=["a"]))) is None


# -- odds and ends ---------------------------------------------------------------------------


def test_a_copy_is_independent_both_ways() -> None:
    engine = Engine(workflow(MAP))
    engine.tick()
    engine.complete("list", output=[1, 2, 3, 4])
    snapshot = engine.state.copy()
    frozen = replay(engine.events)
    engine.tick()
    assert snapshot == frozen  # changing the original after the copy did not change the copy
    copy = engine.state.copy()
    copy.apply(StepFinished(run="run-1", step="each", item=0, attempt=1, status="ok", at_ms=T0))
    assert engine.state == replay(engine.events)  # nor the other way round
    assert copy != engine.state


def test_next_wakeup_ignores_retries_that_wait_for_a_slot() -> None:
    engine = Engine(workflow(MAP.replace("max_parallel: 3", "max_parallel: 1")))
    engine.tick()
    engine.complete("list", output=[1, 2])
    engine.tick()
    engine.complete("each", 0, status="error")
    engine.tick()  # item 1 takes the only slot
    assert engine.running() == [("each", 1)]
    assert engine.state.next_wakeup(T0) == T0 + 1000  # the retry's time...
    assert engine.state.next_wakeup(T0 + 1000) == T0 + 30_000  # ...then only item 1's timeout
    assert starts(engine.tick(T0 + 1000)) == []
    engine.complete("each", 1, output=2)
    assert starts(engine.tick()) == [("each", 0, 2)]


def test_the_history_records_decisions_without_invocations() -> None:
    engine = Engine(workflow(MAP + "  - {id: cond, function: f, when: $.input.go}\n"))
    engine.tick()
    engine.complete("list", output=[])
    engine.tick()
    finished = [(e.step, e.item, e.status, e.output) for e in engine.events if isinstance(e, StepFinished)]
    assert finished == [("cond", None, "skipped", None), ("list", None, "ok", []), ("each", None, "ok", [])]
