"""The trigger family: what makes a function run besides an invocation record or HTTP.

``trigger.spec`` (compacted ``trigger`` topic, key = trigger name) defines a *topic trigger*
(one invocation per record of any topic) or a *cron trigger* (one invocation per slot of a
schedule). The trigger service writes:

- ``trigger.fired`` (compacted ``trigger-firing``, key = trigger name): the latest slot a cron
  trigger fired, written in one transaction with that slot's invocation, so a slot is fired once;
- ``trigger.status`` (compacted ``trigger-status``, key = ``<trigger>/<service copy>``): what a
  copy of the service is doing with a trigger, and its lag;
- ``trigger.failed`` on a topic trigger's error topic: a source record whose function did not
  succeed after its retries (or that could not be sent at all), with the error and where the
  record came from.

Invocation ids are deterministic, so a record or a slot handled twice (a crash, two copies)
collapses into one invocation wherever ids are deduplicated: ``trg.<trigger>.<topic>-<partition>-<offset>``
(``.r<n>`` for the n-th retry) and ``cron.<trigger>.<slot epoch ms>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from events.base import Record, now_ms
from events.invocation import ErrorInfo
from events.topics import Topics, TopicSpec

TriggerKind = Literal["topic", "cron"]
Ordering = Literal["per-key", "none"]
StartFrom = Literal["earliest", "latest"]
CatchUp = Literal["once", "none"]

_DAY_MS = 24 * 60 * 60 * 1000


class TriggerSpec(Record):
    """A trigger's definition (the latest one per name is the trigger; a tombstone deletes it)."""

    type: Literal["trigger.spec"] = "trigger.spec"
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    function: str = Field(min_length=1, max_length=200)
    """The function (or workflow) each record or firing invokes."""
    kind: TriggerKind = "topic"
    paused: bool = False
    """A paused trigger consumes nothing and fires nothing (a topic trigger keeps its offsets)."""
    # ----- topic triggers
    topic: str | None = None
    """The source topic (any topic, any bytes)."""
    group: str | None = None
    """The consumer group; default ``stoker-trigger-<name>`` (see :attr:`consumer_group`)."""
    response_topic: str | None = None
    """Where the function's output goes (JSON, key = the source record's key)."""
    error_topic: str | None = None
    """Where ``trigger.failed`` records go; without one, failures are only counted and logged."""
    max_retries: int = Field(default=3, ge=0, le=100)
    backoff_s: float = Field(default=1.0, ge=0, le=3600)
    """Wait before the first retry; doubled for each further one."""
    concurrency: int = Field(default=8, ge=1, le=1000)
    """Records of this trigger running at once, per service copy."""
    ordered: Ordering = "none"
    """``per-key``: records with the same key (in one partition) run one after another."""
    start: StartFrom = "latest"
    """Where a new consumer group starts on the source topic."""
    # ----- cron triggers
    cron: str | None = None
    """A five-field cron expression (minute hour day-of-month month day-of-week), or six fields
    with a leading seconds field (``*/10 * * * * *``: every ten seconds)."""
    payload: Any = None
    """The event each firing passes to the function (besides the firing's own fields)."""
    timezone: str = "UTC"
    """An IANA zone the expression is read in (``Europe/Berlin``); DST is handled by the cron library."""
    catch_up: CatchUp = "once"
    """After an outage: ``once`` fires the latest missed slot once; ``none`` skips missed slots."""
    revision: int = 1
    created_ms: int = Field(default_factory=now_ms)
    updated_ms: int = Field(default_factory=now_ms)
    active_since_ms: int = Field(default_factory=now_ms)
    """When it was created or last resumed: no cron slot at or before this fires."""

    @property
    def consumer_group(self) -> str:
        return self.group or f"stoker-trigger-{self.name}"


class TriggerFired(Record):
    """A cron trigger fired the slot ``slot_ms`` (its invocation was written with this record)."""

    type: Literal["trigger.fired"] = "trigger.fired"
    trigger: str
    slot_ms: int
    """The scheduled time of the slot (epoch ms), not when it was written."""
    invocation: str
    revision: int = 1
    """The trigger's revision when it fired (a new revision starts its schedule afresh)."""
    at_ms: int = Field(default_factory=now_ms)


TriggerState = Literal["running", "waiting_for_topic", "paused", "standby"]


class TriggerStatus(Record):
    """What one copy of the trigger service does with one trigger, and how far behind it is."""

    type: Literal["trigger.status"] = "trigger.status"
    trigger: str
    instance: str
    state: TriggerState
    reason: str = ""
    """Why it is not running (``topic 'orders' does not exist``)."""
    lag: dict[str, int] = Field(default_factory=dict)
    """Per owned source partition (``"0"``): records not yet committed (end offset - committed)."""
    delivered: int = 0
    """Records whose function succeeded (since this copy started)."""
    failed: int = 0
    """Records that went to the error topic (or were dropped without one)."""
    retried: int = 0
    in_flight: int = 0
    fired: int = 0
    """Cron slots fired by this copy."""
    last_fired_ms: int | None = None
    next_fire_ms: int | None = None
    at_ms: int = Field(default_factory=now_ms)


class TriggerFailed(Record):
    """A source record whose function did not succeed: the error topic's record."""

    type: Literal["trigger.failed"] = "trigger.failed"
    trigger: str
    function: str
    source_topic: str
    partition: int
    offset: int
    key: str | None = None
    timestamp_ms: int | None = None
    reason: str
    """``function_failed`` (after its retries), ``record_too_large``, or another platform reason."""
    error: ErrorInfo | None = None
    """The last attempt's error (kind, message, traceback)."""
    attempts: int = 0
    invocations: list[str] = Field(default_factory=list)
    value: Any = None
    """The record's value as the function would have received it (JSON, or base64 text)."""
    value_encoding: Literal["json", "base64"] = "json"
    at_ms: int = Field(default_factory=now_ms)


@dataclass(frozen=True)
class TriggerTopics:
    """The trigger family's topics under a platform's prefix."""

    topics: Topics

    @property
    def definitions(self) -> str:
        return f"{self.topics.prefix}trigger"

    @property
    def firing(self) -> str:
        return f"{self.topics.prefix}trigger-firing"

    @property
    def status(self) -> str:
        return f"{self.topics.prefix}trigger-status"

    def specs(self) -> list[TopicSpec]:
        return [
            TopicSpec(self.definitions, compacted=True),
            TopicSpec(self.firing, compacted=True),
            TopicSpec(self.status, compacted=True, retention_ms=_DAY_MS),
        ]


def record_invocation_id(trigger: str, topic: str, partition: int, offset: int, attempt: int = 1) -> str:
    """The invocation id of one record's attempt: the same record and attempt, the same id."""
    base = f"trg.{trigger}.{topic}-{partition}-{offset}"
    return base if attempt == 1 else f"{base}.r{attempt}"


def cron_invocation_id(trigger: str, slot_ms: int) -> str:
    """The invocation id of one cron slot."""
    return f"cron.{trigger}.{slot_ms}"
