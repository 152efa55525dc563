"""The pure state machine of one workflow run: what has happened (events) -> what to do now (actions).

A run is event-sourced: :class:`RunState` is built from its ``RunStarted`` and changed only by
:meth:`RunState.apply` (``StepStarted``, ``StepFinished``, ``RunFinished``). Applying an event
twice, or an event that is no longer current (a late result of an attempt that timed out, anything
after the run finished), changes nothing, so replaying a run's topic rebuilds it exactly.

:func:`next_actions` looks at a state and the clock and says what to do; it never changes the
state. Most actions carry the ``event`` that records them: the engine writes that event to the
run's topic and applies it to its state (before it asks for more actions), then does the side
effect (publish the invocation, the run's result, a prewarm). Everything is deterministic: the
same events and clock give the same actions, and invocation ids are derived from the run, step,
item and attempt, so an engine that restarts mid-step asks for the same invocation again (and the
platform does not run a repeated id twice).

Semantics:

- A step starts when all its ``after`` steps finished ``ok``. If one of them was skipped, or its
  ``when`` is false, it is skipped (and so, in turn, are the steps after it).
- A mapped step evaluates ``map`` once its ``after`` steps are done and runs its input once per
  item, at most ``max_parallel`` at a time, lowest item first; its output is the list of the
  items' outputs in item order. An empty list finishes the step ``ok`` with ``[]``; anything but
  a list fails it.
- An attempt fails when its result is ``error``, ``timeout``, ``rejected`` or ``lost``, or when no
  result came ``timeout_s`` after it started (the step's own timeout). A failed attempt is retried
  after ``backoff_s * 2**(attempt-1)`` seconds while ``attempt <= retries``; then the step fails.
- A failed step fails the run at once: running attempts are recorded ``cancelled`` (their results
  are ignored) and the run finishes ``error`` with ``error.kind = "step <id> failed: <kind>"``.
  A run whose ``deadline_ms`` passes finishes ``timeout`` the same way.
- When every step is ``ok`` or skipped, the run finishes ``ok`` with ``output`` rendered (default:
  ``{id: output}`` of the steps no other step runs after).
- *Prewarm*: a step is *soon* when it has not started, every step it runs after has started or
  finished ``ok``, and at least one is still running: it will start when they finish. A step
  becomes soon when its last dependency starts; that is when it is prewarmed, once, so its
  function is loaded while the steps before it run (at run start: the second wave).

Driving it (what the engine service does for each run)::

    state = RunState.start(run_started)          # or replay(events) after a restart
    for action in next_actions(state, now):
        if action.event is not None:             # record first: the log is the truth
            publish(workflow_run, key=state.run, value=action.event)
            state.apply(action.event)
        match action:
            case StartStep():  publish(invocation, key=action.function, value=action.request())
            case Prewarm():    publish(prewarm, PrewarmRequested(function=..., count=..., reason=...))
            case FinishRun():  publish the run's own result (id = state.run) to result / reply_to
            case RetryAt():    pass                # state.next_wakeup(now) covers every timer
    wake up at state.next_wakeup(now) and call next_actions again;
    on an InvocationCompleted: event = state.result(completed, now) -> None (not current: drop it)
    or a StepFinished to publish and apply, then next_actions again.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from events.invocation import ErrorInfo, InvocationCompleted, InvocationRequested, Status
from events.workflow import RunEvent, RunFinished, RunStarted, StepFinished, StepSpec, StepStarted, WorkflowSpec
from services.workflow.expr import Expr, ExprError, check_template, parse, references, render

__all__ = [
    "MAX_MAP_ITEMS",
    "Action",
    "EndStep",
    "FinishRun",
    "Prewarm",
    "RetryAt",
    "RunState",
    "SkipStep",
    "StartStep",
    "StepState",
    "Unit",
    "backoff_ms",
    "invocation_id",
    "next_actions",
    "replay",
    "spec_problem",
]

MAX_MAP_ITEMS = 10_000
"""A map over more items fails its step (``map_too_large``)."""
MAX_INVOCATION_ID = 200
MAX_PREWARM = 64

StepStatus = Literal["waiting", "running", "ok", "skipped", "failed"]
UnitStatus = Literal["running", "retry", "ok", "failed", "cancelled"]


def invocation_id(run: str, step: str, item: int | None, attempt: int) -> str:
    """The id of one attempt's invocation: ``{run}.{step}.{item or 0}.{attempt}``.

    A run id too long for that (ids are at most 200 characters) is replaced by a hash of it.
    """
    suffix = f".{step}.{item or 0}.{attempt}"
    if len(run) + len(suffix) > MAX_INVOCATION_ID:
        run = "wf-" + hashlib.sha256(run.encode()).hexdigest()[:40]
    return run + suffix


def backoff_ms(step: StepSpec, failed_attempt: int) -> int:
    """How long after attempt ``failed_attempt`` failed the next one starts."""
    return round(step.backoff_s * 1000 * 2 ** (failed_attempt - 1))


# ---------------------------------------------------------------------------------------------
# State


@dataclass(frozen=True)
class Unit:
    """One invocation slot of a step: the step itself, or one item of a mapped step."""

    status: UnitStatus = "running"
    attempt: int = 1
    """The latest attempt started."""
    invocation: str = ""
    started_ms: int = 0
    finished_ms: int = 0
    """When the latest attempt ended (the backoff counts from there)."""
    output: Any = None
    error: ErrorInfo | None = None


def _order(key: int | None) -> int:
    return -1 if key is None else key


@dataclass
class StepState:
    spec: StepSpec
    status: StepStatus = "waiting"
    units: dict[int | None, Unit] = field(default_factory=dict)
    """``None`` for a plain step, the item index for a mapped one; items start in index order."""
    items: int | None = None
    """A mapped step's item count, fixed when it starts."""
    output: Any = None
    error: ErrorInfo | None = None
    reason: str = ""
    """Why it was skipped."""
    # Indexes derived from ``units`` so that a long map costs O(1) per event, not O(items):
    running: set[int | None] = field(default_factory=set)
    retrying: set[int | None] = field(default_factory=set)
    succeeded: int = 0

    @property
    def decided(self) -> bool:
        return self.status in ("ok", "skipped", "failed")

    def copy(self) -> StepState:
        return replace(self, units=dict(self.units), running=set(self.running), retrying=set(self.retrying))

    def put(self, key: int | None, unit: Unit) -> None:
        """Set a unit, keeping the indexes right."""
        old = self.units.get(key)
        if old is not None:
            self.running.discard(key)
            self.retrying.discard(key)
            self.succeeded -= old.status == "ok"
        self.units[key] = unit
        if unit.status == "running":
            self.running.add(key)
        elif unit.status == "retry":
            self.retrying.add(key)
        self.succeeded += unit.status == "ok"


@dataclass
class RunState:
    """Everything :func:`next_actions` needs about one run, rebuilt from its events alone."""

    run: str
    spec: WorkflowSpec
    input: Any = None
    started_ms: int = 0
    deadline_ms: int | None = None
    reply_to: str | None = None
    steps: dict[str, StepState] = field(default_factory=dict)
    status: Status | None = None
    """Set when the run finished."""
    output: Any = None
    error: ErrorInfo | None = None
    failed_step: str | None = None
    """The first step that failed for good."""
    finished_ms: int = 0
    problem: str | None = None
    """Why the definition cannot run (one that did not come through ``dsl.load``): the run fails at once."""
    _shared: set[str] = field(default_factory=set, compare=False, repr=False)
    """Steps still shared with the state this one was copied from (copied before a change)."""

    @classmethod
    def start(cls, event: RunStarted) -> RunState:
        return cls(
            run=event.run,
            spec=event.workflow,
            input=event.input,
            started_ms=event.at_ms,
            deadline_ms=event.deadline_ms,
            reply_to=event.reply_to,
            steps={step.id: StepState(step) for step in event.workflow.steps},
            problem=spec_problem(event.workflow),
        )

    @property
    def finished(self) -> bool:
        return self.status is not None

    def copy(self) -> RunState:
        """An independent copy; steps are copied when one of the two changes them (outputs are shared:
        they are never mutated)."""
        self._shared = set(self.steps)
        return replace(self, steps=dict(self.steps), _shared=set(self.steps))

    def _own(self, step_id: str) -> StepState:
        """The step, for changing it: a private copy if it is still shared."""
        if step_id in self._shared:
            self._shared.discard(step_id)
            self.steps[step_id] = self.steps[step_id].copy()
        return self.steps[step_id]

    def context(self, item: Any = None, index: int | None = None) -> dict[str, Any]:
        """The expression context: ``input``, finished ``steps`` and, for a map item, ``item``/``index``."""
        steps = {
            step_id: {"output": step.output, "status": step.status}
            for step_id, step in self.steps.items()
            if step.status in ("ok", "skipped")
        }
        context: dict[str, Any] = {"input": self.input, "steps": steps}
        if index is not None:
            context["item"] = item
            context["index"] = index
        return context

    def map_items(self, step: StepState) -> Any:
        """The value of a mapped step's ``map`` expression now (a list, when the definition is right)."""
        assert step.spec.map is not None
        try:
            return parse(step.spec.map).evaluate(self.context())
        except ExprError:
            return None

    def running(self) -> Iterable[tuple[StepState, int | None, Unit]]:
        """Every attempt in flight, in definition and item order."""
        for step in self.steps.values():
            for item in sorted(step.running, key=_order):
                yield step, item, step.units[item]

    def attempt_of(self, invocation: str) -> tuple[str, int | None, int] | None:
        """(step, item, attempt) of the running attempt with this invocation id, if it is current."""
        if self.finished:
            return None
        for step, item, unit in self.running():
            if unit.invocation == invocation:
                return step.spec.id, item, unit.attempt
        return None

    def result(self, completed: InvocationCompleted, at_ms: int) -> StepFinished | None:
        """The ``StepFinished`` to record for a function's result, or ``None`` if it is not current."""
        found = self.attempt_of(completed.id)
        if found is None:
            return None
        step, item, attempt = found
        return StepFinished(
            run=self.run,
            step=step,
            item=item,
            attempt=attempt,
            status=completed.status,
            output=completed.output,
            error=completed.error,
            start=completed.start,
            timings_ms=completed.timings_ms,
            at_ms=at_ms,
        )

    # -- events

    def apply(self, event: RunEvent) -> bool:
        """Apply one event of this run; whether it changed anything (stale and repeated events do not)."""
        if getattr(event, "run", None) != self.run or self.finished:
            return False
        if isinstance(event, StepStarted):
            return self._started(event)
        if isinstance(event, StepFinished):
            return self._finished(event)
        if isinstance(event, RunFinished):
            self.status = event.status
            self.output = event.output
            self.error = event.error
            self.finished_ms = event.at_ms
            return True
        return False

    def _started(self, event: StepStarted) -> bool:
        step = self.steps.get(event.step)
        if step is None or step.decided or (step.spec.map is None) != (event.item is None):
            return False
        unit = step.units.get(event.item)
        if unit is not None and (event.attempt <= unit.attempt or unit.status != "retry"):
            return False
        count = step.items
        if event.item is not None:
            if count is None:
                items = self.map_items(step)
                if not isinstance(items, list):
                    return False
                count = len(items)
            if not 0 <= event.item < count:
                return False
        step = self._own(event.step)
        step.items = count
        step.put(event.item, Unit(attempt=event.attempt, invocation=event.invocation, started_ms=event.at_ms))
        step.status = "running"
        return True

    def _finished(self, event: StepFinished) -> bool:
        step = self.steps.get(event.step)
        if step is None:
            return False
        unit = step.units.get(event.item)
        current = unit is not None and unit.status == "running" and unit.attempt == event.attempt
        if event.status == "cancelled":
            # Also for the other items of a step that failed: whatever runs when the run ends.
            if unit is None or not current:
                return False
            self._own(event.step).put(event.item, replace(unit, status="cancelled", finished_ms=event.at_ms))
            return True
        if step.decided:
            return False
        if event.status == "skipped":
            if step.status != "waiting":
                return False
            step = self._own(event.step)
            step.status = "skipped"
            step.reason = event.error.message if event.error else ""
            return True
        if event.item is None and not step.units:
            # The step as a whole, decided without an invocation: an empty map, or a bad one.
            if step.status != "waiting":
                return False
            step = self._own(event.step)
            if event.status == "ok":
                step.status, step.output = "ok", event.output
                step.items = 0 if step.spec.map is not None else None
            else:
                self._fail(step, event.error or ErrorInfo(kind=event.status))
            return True
        if unit is None or not current:
            return False
        step = self._own(event.step)
        if event.status == "ok":
            step.put(event.item, replace(unit, status="ok", output=event.output, finished_ms=event.at_ms))
            self._maybe_done(step)
            return True
        error = event.error or ErrorInfo(kind=event.status, message=f"the attempt ended {event.status}")
        if event.attempt <= step.spec.retries:
            step.put(event.item, replace(unit, status="retry", error=error, finished_ms=event.at_ms))
            return True
        step.put(event.item, replace(unit, status="failed", error=error, finished_ms=event.at_ms))
        if event.item is not None:
            message = f"item {event.item}: {error.message}" if error.message else f"item {event.item}"
            error = error.model_copy(update={"message": message})
        self._fail(step, error)
        return True

    def _fail(self, step: StepState, error: ErrorInfo) -> None:
        step.status, step.error = "failed", error
        if self.failed_step is None:
            self.failed_step = step.spec.id

    def _maybe_done(self, step: StepState) -> None:
        if step.spec.map is None:
            step.status, step.output = "ok", step.units[None].output
        elif step.succeeded == step.items:
            step.status = "ok"
            step.output = [step.units[index].output for index in range(step.succeeded)]

    # -- timers

    def retry_due_ms(self, step: StepState, unit: Unit) -> int:
        return unit.finished_ms + backoff_ms(step.spec, unit.attempt)

    def next_wakeup(self, now_ms: int) -> int | None:
        """The earliest time after ``now_ms`` at which :func:`next_actions` may have something new
        to do without a new event (a retry, an attempt's timeout, the run's deadline)."""
        if self.finished:
            return None
        times = [] if self.deadline_ms is None else [self.deadline_ms]
        for step in self.steps.values():
            timeout_ms = round(step.spec.timeout_s * 1000)
            times.extend(step.units[item].started_ms + timeout_ms for item in step.running)
            if not step.decided:
                times.extend(self.retry_due_ms(step, step.units[item]) for item in step.retrying)
        later = [time for time in times if time > now_ms]
        return min(later) if later else None


def spec_problem(spec: WorkflowSpec) -> str | None:
    """What keeps a definition from running, if anything: ``dsl.load`` rejects all of these at create
    time, but any Kafka client can write a ``WorkflowSpec``, and a bad one must fail its runs, not the engine."""
    ids = [step.id for step in spec.steps]
    if not ids:
        return "the workflow has no steps"
    if len(set(ids)) != len(ids):
        return "step ids are not unique"
    for step in spec.steps:
        unknown = [dep for dep in step.after if dep not in ids]
        if unknown:
            return f"step {step.id} runs after unknown step {unknown[0]}"
    done: set[str] = set()
    while len(done) < len(ids):
        ready = [step.id for step in spec.steps if step.id not in done and set(step.after) <= done]
        if not ready:
            return "the steps' `after` have a cycle"
        done.update(ready)
    for step in spec.steps:
        errors = check_template(step.input)
        if errors:
            return f"step {step.id}: input: {errors[0]}"
        for name in ("when", "map"):
            text = getattr(step, name)
            if text is not None:
                try:
                    parse(text)
                except ExprError as error:
                    return f"step {step.id}: {name}: {error}"
    errors = check_template(spec.output)
    if errors:
        return f"output: {errors[0]}"
    return None


def replay(events: Iterable[RunEvent]) -> RunState:
    """The state of a run from its events, ``RunStarted`` first."""
    iterator = iter(events)
    first = next(iterator, None)
    if not isinstance(first, RunStarted):
        raise ValueError("a run's events start with RunStarted")
    state = RunState.start(first)
    for event in iterator:
        state.apply(event)
    return state


# ---------------------------------------------------------------------------------------------
# Actions


@dataclass(frozen=True)
class StartStep:
    """Start one attempt: record ``event``, then publish :meth:`request` to the invocation topic."""

    step: str
    function: str
    item: int | None
    attempt: int
    input: Any
    invocation_id: str
    timeout_s: float
    deadline_ms: int | None
    """When the attempt times out (or the run's deadline, if sooner): the request's deadline."""
    event: StepStarted

    def request(self, reply_to: str | None = None) -> InvocationRequested:
        return InvocationRequested(
            id=self.invocation_id,
            function=self.function,
            payload=self.input,
            reply_to=reply_to,
            deadline_ms=self.deadline_ms,
            requested_ms=self.event.at_ms,
        )


@dataclass(frozen=True)
class RetryAt:
    """Attempt ``attempt`` of a step (item) starts at ``at_ms``: wake up then (no event)."""

    step: str
    item: int | None
    attempt: int
    at_ms: int
    event: None = None


@dataclass(frozen=True)
class SkipStep:
    """The step does not run (``when`` is false, or a step it runs after was skipped): record ``event``."""

    step: str
    reason: str
    event: StepFinished


@dataclass(frozen=True)
class EndStep:
    """A step or attempt ends without a function result: record ``event``.

    ``ok``: a map over an empty list; ``error``: a map that is not a list (or too long);
    ``timeout``: no result ``timeout_s`` after the attempt started; ``cancelled``: the run ended
    while the attempt was running (its result will be ignored).
    """

    step: str
    item: int | None
    attempt: int
    status: Literal["ok", "error", "timeout", "cancelled"]
    reason: str
    event: StepFinished


@dataclass(frozen=True)
class FinishRun:
    """The run is over: record ``event``, then publish the run's result."""

    status: Status
    output: Any
    error: ErrorInfo | None
    event: RunFinished


@dataclass(frozen=True)
class Prewarm:
    """Load ``function`` into ``count`` instances now: step ``step`` will start soon (no event)."""

    step: str
    function: str
    count: int
    reason: str
    event: None = None


Action = StartStep | RetryAt | SkipStep | EndStep | FinishRun | Prewarm


def next_actions(state: RunState, now_ms: int) -> list[Action]:
    """What to do now, in order. Does not change ``state``: apply each action's ``event`` to it.

    Decisions cascade within one call (a skip skips the steps after it, an empty map lets the
    steps after it start), so after applying the returned events, calling again at the same time
    returns only ``RetryAt`` reminders.
    """
    if state.finished:
        return []
    sim = state.copy()
    actions: list[Action] = []
    while not sim.finished:
        batch = _decide(sim, now_ms)
        if not batch:
            break
        for action in batch:
            actions.append(action)
            if action.event is not None:
                sim.apply(action.event)
    if sim.finished:
        return actions
    for step in sim.steps.values():
        if step.decided:
            continue
        for item in sorted(step.retrying, key=_order):
            unit = step.units[item]
            actions.append(RetryAt(step.spec.id, item, unit.attempt + 1, sim.retry_due_ms(step, unit)))
    if sim.spec.prewarm:
        fresh = _soon(sim) - _soon(state)
        for step in sim.steps.values():
            if step.spec.id in fresh:
                actions.extend(_prewarm(sim, step))
    return actions


def _decide(state: RunState, now_ms: int) -> list[Action]:
    """One round of decisions on the current state (the caller applies them and asks again)."""
    if state.problem is not None:
        error = ErrorInfo(kind="invalid_workflow", message=state.problem)
        return [*_cancel_all(state, now_ms), _finish(state, "error", None, error, now_ms)]
    if state.deadline_ms is not None and now_ms >= state.deadline_ms:
        running = sorted({step.spec.id for step, _, _ in state.running()})
        message = "the run's deadline passed" + (f" while {', '.join(running)} ran" if running else "")
        return [
            *_cancel_all(state, now_ms),
            _finish(state, "timeout", None, ErrorInfo(kind="deadline", message=message), now_ms),
        ]
    if state.failed_step is not None:
        failed = state.steps[state.failed_step]
        cause = failed.error or ErrorInfo(kind="error")
        error = ErrorInfo(
            kind=f"step {failed.spec.id} failed: {cause.kind}", message=cause.message, traceback=cause.traceback
        )
        return [*_cancel_all(state, now_ms), _finish(state, "error", None, error, now_ms)]

    actions: list[Action] = []
    for step, item, unit in state.running():
        if now_ms >= unit.started_ms + round(step.spec.timeout_s * 1000):
            reason = f"no result within {step.spec.timeout_s:g}s"
            error = ErrorInfo(kind="timeout", message=reason)
            actions.append(_end(state, step, item, unit.attempt, "timeout", reason, now_ms, error=error))
    if actions:
        return actions

    context: dict[str, Any] | None = None
    for step in state.steps.values():
        if step.decided:
            continue
        spec = step.spec
        if step.status == "waiting":
            deps = [state.steps[dep] for dep in spec.after]
            skipped = [dep.spec.id for dep in deps if dep.status == "skipped"]
            if skipped:
                actions.append(_skip(state, step, f"`{skipped[0]}` was skipped", now_ms))
                continue
            if not all(dep.status == "ok" for dep in deps):
                continue
            context = context or state.context()
            if spec.when is not None and not parse(spec.when).test(context):
                actions.append(_skip(state, step, f"`when` is false: {spec.when}", now_ms))
                continue
        if spec.map is None:
            only = step.units.get(None)
            if only is None:
                context = context or state.context()
                actions.append(_start(state, step, None, 1, render(spec.input, context), now_ms))
            elif only.status == "retry" and state.retry_due_ms(step, only) <= now_ms:
                context = context or state.context()
                actions.append(_start(state, step, None, only.attempt + 1, render(spec.input, context), now_ms))
            continue
        context = context or state.context()
        actions.extend(_map_actions(state, step, context, now_ms))

    if not actions and all(step.status in ("ok", "skipped") for step in state.steps.values()):
        context = state.context()
        if state.spec.output is None:
            sinks = {step.id for step in state.spec.steps} - {dep for step in state.spec.steps for dep in step.after}
            output: Any = {step.id: state.steps[step.id].output for step in state.spec.steps if step.id in sinks}
        else:
            output = render(state.spec.output, context)
        actions.append(_finish(state, "ok", output, None, now_ms))
    return actions


def _map_actions(state: RunState, step: StepState, context: Mapping[str, Any], now_ms: int) -> list[Action]:
    spec = step.spec
    assert spec.map is not None
    items = parse(spec.map).evaluate(context)
    if step.status == "waiting":
        if not isinstance(items, list):
            kind = "null" if items is None else type(items).__name__
            reason = f"`map` gave {kind}, not a list: {spec.map}"
            return [
                _end(state, step, None, 1, "error", reason, now_ms, ErrorInfo(kind="map_not_a_list", message=reason))
            ]
        if len(items) > MAX_MAP_ITEMS:
            reason = f"`map` gave {len(items)} items, more than {MAX_MAP_ITEMS}"
            return [
                _end(state, step, None, 1, "error", reason, now_ms, ErrorInfo(kind="map_too_large", message=reason))
            ]
        if not items:
            return [_end(state, step, None, 1, "ok", "`map` gave an empty list", now_ms, output=[])]
    assert isinstance(items, list)
    # Items start in index order, so the started ones are 0..len(units)-1: due retries (lowest
    # first) go before fresh items, which is item order.
    due = sorted(
        index for index in step.retrying if index is not None and state.retry_due_ms(step, step.units[index]) <= now_ms
    )
    fresh = (index for index in range(len(step.units), len(items)) if index not in step.units)
    candidates = itertools.chain(due, fresh)
    slots = spec.max_parallel - len(step.running)
    actions: list[Action] = []
    for index in itertools.islice(candidates, max(slots, 0)):
        unit = step.units.get(index)
        attempt = 1 if unit is None else unit.attempt + 1
        payload = render(spec.input, {**context, "item": items[index], "index": index})
        actions.append(_start(state, step, index, attempt, payload, now_ms))
    return actions


def _start(state: RunState, step: StepState, item: int | None, attempt: int, payload: Any, now_ms: int) -> StartStep:
    spec = step.spec
    invocation = invocation_id(state.run, spec.id, item, attempt)
    deadline = now_ms + round(spec.timeout_s * 1000)
    if state.deadline_ms is not None:
        deadline = min(deadline, state.deadline_ms)
    event = StepStarted(
        run=state.run, step=spec.id, item=item, attempt=attempt, invocation=invocation, input=payload, at_ms=now_ms
    )
    return StartStep(spec.id, spec.function, item, attempt, payload, invocation, spec.timeout_s, deadline, event)


def _skip(state: RunState, step: StepState, reason: str, now_ms: int) -> SkipStep:
    event = StepFinished(
        run=state.run,
        step=step.spec.id,
        status="skipped",
        error=ErrorInfo(kind="skipped", message=reason),
        at_ms=now_ms,
    )
    return SkipStep(step.spec.id, reason, event)


def _end(
    state: RunState,
    step: StepState,
    item: int | None,
    attempt: int,
    status: Literal["ok", "error", "timeout", "cancelled"],
    reason: str,
    now_ms: int,
    error: ErrorInfo | None = None,
    output: Any = None,
) -> EndStep:
    if status == "cancelled":
        error = ErrorInfo(kind="cancelled", message=reason)
    event = StepFinished(
        run=state.run,
        step=step.spec.id,
        item=item,
        attempt=attempt,
        status=status,
        output=output,
        error=error,
        at_ms=now_ms,
    )
    return EndStep(step.spec.id, item, attempt, status, reason, event)


def _cancel_all(state: RunState, now_ms: int) -> list[Action]:
    reason = "the run ended"
    return [_end(state, step, item, unit.attempt, "cancelled", reason, now_ms) for step, item, unit in state.running()]


def _finish(state: RunState, status: Status, output: Any, error: ErrorInfo | None, now_ms: int) -> FinishRun:
    event = RunFinished(
        run=state.run, workflow=state.spec.name, status=status, output=output, error=error, at_ms=now_ms
    )
    return FinishRun(status, output, error, event)


# ---------------------------------------------------------------------------------------------
# Prewarm


def _soon(state: RunState) -> set[str]:
    """Steps not started whose dependencies have all started or finished ok, some still running."""
    if state.finished:
        return set()
    soon = set()
    for step in state.steps.values():
        if step.status != "waiting" or not step.spec.after:
            continue
        deps = [state.steps[dep].status for dep in step.spec.after]
        if all(status in ("running", "ok") for status in deps) and "running" in deps:
            soon.add(step.spec.id)
    return soon


def _known(state: RunState, expr: Expr) -> bool:
    """Whether every step the expression reads has finished (so its value is final)."""
    return "item" not in expr.roots() and all(state.steps[ref].status in ("ok", "skipped") for ref in references(expr))


def _prewarm(state: RunState, step: StepState) -> list[Prewarm]:
    spec = step.spec
    if spec.when is not None:
        when = parse(spec.when)
        if _known(state, when) and not when.test(state.context()):
            return []
    count = 1
    if spec.map is not None:
        count = min(spec.max_parallel, MAX_PREWARM)
        expr = parse(spec.map)
        if _known(state, expr):
            items = expr.evaluate(state.context())
            if isinstance(items, list):
                count = min(count, len(items))
        if count == 0:
            return []
    running = ", ".join(dep for dep in spec.after if state.steps[dep].status == "running")
    reason = f"workflow {state.spec.name} run {state.run}: step {spec.id} starts after {running}"
    return [Prewarm(spec.id, spec.function, count, reason)]
