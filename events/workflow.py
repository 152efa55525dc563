"""The workflow family: workflow definitions and the event-sourced state of their runs.

``workflow.spec`` (compacted ``workflow`` topic, key = workflow name) is a validated definition.
A run's history is a sequence of events on ``workflow-run`` (key = run id, which is the invocation
id): ``run-started``, then ``step-started``/``step-finished`` per step attempt, then one
``run-finished``. A restarted engine replays these to resume every run where it stopped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from events.base import Record, now_ms
from events.invocation import ErrorInfo, Status, Timings


class StepSpec(BaseModel):
    """One step: call ``function`` with ``input`` once every step in ``after`` has finished ok."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    function: str
    input: Any = "$.input"
    """A JSON template: strings starting with ``$`` are expressions (``$$`` escapes a literal ``$``)."""
    after: list[str] = Field(default_factory=list)
    when: str | None = None
    """A condition; false skips the step (its dependents see it as ``skipped``)."""
    map: str | None = None
    """An expression giving a list: the step runs once per item (``$.item``, ``$.index``)."""
    max_parallel: int = Field(default=4, ge=1, le=1000)
    timeout_s: float = Field(default=30.0, gt=0, le=3600)
    retries: int = Field(default=0, ge=0, le=20)
    backoff_s: float = Field(default=0.5, ge=0, le=600)
    """Wait before the first retry; doubled for each further one."""
    line: int = 0
    """Where the step is defined in its YAML (for messages)."""


class WorkflowSpec(Record):
    type: Literal["workflow.spec"] = "workflow.spec"
    name: str
    steps: list[StepSpec]
    output: Any = None
    """A JSON template of the run's output (default: the outputs of the steps nothing depends on)."""
    prewarm: bool = True
    """Prewarm the steps that will soon run when a run starts."""
    revision: int = 1
    source: str = ""
    """The YAML it was created from."""
    updated_ms: int = Field(default_factory=now_ms)


class RunStarted(Record):
    type: Literal["workflow.run-started"] = "workflow.run-started"
    run: str
    """The run id: the id of the invocation that started it."""
    workflow: WorkflowSpec
    input: Any = None
    reply_to: str | None = None
    deadline_ms: int | None = None
    requested_ms: int = 0
    trace: dict[str, str] = Field(default_factory=dict)
    """The W3C trace context of the run: every step's span joins this one trace."""
    at_ms: int = Field(default_factory=now_ms)


class StepStarted(Record):
    type: Literal["workflow.step-started"] = "workflow.step-started"
    run: str
    step: str
    item: int | None = None
    attempt: int = 1
    invocation: str
    input: Any = None
    at_ms: int = Field(default_factory=now_ms)


class StepFinished(Record):
    type: Literal["workflow.step-finished"] = "workflow.step-finished"
    run: str
    step: str
    item: int | None = None
    attempt: int = 1
    status: Literal["ok", "error", "timeout", "rejected", "lost", "skipped", "cancelled"]
    output: Any = None
    error: ErrorInfo | None = None
    start: str | None = None
    timings_ms: Timings = Field(default_factory=Timings)
    at_ms: int = Field(default_factory=now_ms)


class RunFinished(Record):
    type: Literal["workflow.run-finished"] = "workflow.run-finished"
    run: str
    workflow: str
    status: Status
    output: Any = None
    error: ErrorInfo | None = None
    at_ms: int = Field(default_factory=now_ms)


RunEvent = RunStarted | StepStarted | StepFinished | RunFinished
