"""Cron triggers: the active copy of the trigger service fires each due slot exactly once.

One copy schedules (the lease ``lease.trigger-cron``, :mod:`services.common.leadership`); the
others stand by. A firing is one transaction of the fenced writer: the slot's invocation
(id ``cron.<trigger>.<slot ms>``) and a ``trigger.fired`` record with the slot. A copy that
takes over reads ``trigger-firing`` (read-committed, after fencing the old holder) and fires only
slots after the recorded ones, so a slot is never fired twice, even with two copies running,
and a slot missed while no copy ran fires once when one comes back (``catch_up=once``) or is
skipped (``none``). The invocation's id also collapses a repeat at the dispatcher.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from events import InvocationRequested, now_ms
from events.triggers import TriggerFired, TriggerSpec, TriggerStatus, TriggerTopics, cron_invocation_id
from services.common import telemetry
from services.common.leadership import FencedWriter, Out
from services.common.views import Table
from services.trigger import metrics, schedule
from services.trigger.settings import TriggerSettings

log = logging.getLogger("stoker.trigger.cron")
tracer = trace.get_tracer("stoker.trigger")


def firing_event(spec: TriggerSpec, slot_ms: int) -> dict[str, object]:
    """What a cron trigger's function receives."""
    return {
        "trigger": spec.name,
        "scheduled_ms": slot_ms,
        "scheduled": datetime.fromtimestamp(slot_ms / 1000, tz=UTC).isoformat(),
        "timezone": spec.timezone,
        "cron": spec.cron,
        "payload": spec.payload,
    }


class CronScheduler:
    """Fires the due slots of every cron trigger while this copy holds the lease."""

    def __init__(
        self,
        settings: TriggerSettings,
        specs: Callable[[], list[TriggerSpec]],
        firings: Table[TriggerFired],
    ) -> None:
        self.settings = settings
        self._specs = specs
        self._firings = firings
        self._topics = TriggerTopics(settings.common.topics)
        self.role = "standby"
        self.fired: dict[str, int] = {}
        """Slots fired by this copy, per trigger."""
        self._last: dict[str, int] = {}
        """Slots this copy fired in its current term (the table may not have read them back yet)."""

    def last_fired(self, name: str) -> int | None:
        row = self._firings.get(name)
        recorded = row.slot_ms if row is not None else None
        mine = self._last.get(name)
        if recorded is None:
            return mine
        return recorded if mine is None else max(recorded, mine)

    async def lead(self, writer: FencedWriter) -> None:
        """A term: catch up with every committed firing, then fire due slots until cancelled."""
        self._last.clear()
        if not await self._firings.wait_caught_up(timeout_s=30.0):
            raise RuntimeError("could not read the trigger-firing topic to its end")
        self.role = "active"
        try:
            while True:
                if writer.broken is not None:
                    raise RuntimeError(f"the writer broke: {writer.broken!r}")
                await self.tick(writer, now_ms())
                await asyncio.sleep(self.settings.cron_tick_s)
        finally:
            self.role = "standby"

    async def tick(self, writer: FencedWriter, at_ms: int) -> None:
        outs: list[Out] = []
        fired: list[tuple[str, int]] = []
        for spec in self._specs():
            if spec.kind != "cron" or spec.paused or not spec.cron:
                continue
            try:
                slot = schedule.due_slot(
                    spec.cron,
                    spec.timezone,
                    last_fired_ms=self.last_fired(spec.name),
                    since_ms=spec.active_since_ms,
                    now_ms=at_ms,
                    catch_up=spec.catch_up,
                )
            except schedule.ScheduleError as exc:
                log.warning("cron trigger %s cannot be scheduled: %s", spec.name, exc)
                continue
            if slot is None:
                continue
            ident = cron_invocation_id(spec.name, slot)
            with tracer.start_as_current_span(
                f"trigger {spec.name} fire",
                kind=SpanKind.PRODUCER,
                attributes={
                    telemetry.INVOCATION_ID: ident,
                    telemetry.FUNCTION: spec.function,
                    "stoker.trigger": spec.name,
                },
            ):
                inv = InvocationRequested(
                    id=ident,
                    function=spec.function,
                    payload=firing_event(spec, slot),
                    deadline_ms=at_ms + int(self.settings.invocation_deadline_s * 1000),
                )
                outs.append(Out(self.settings.common.topics.invocation, inv, key=spec.function))
                outs.append(
                    Out(
                        self._topics.firing,
                        TriggerFired(trigger=spec.name, slot_ms=slot, invocation=ident, revision=spec.revision),
                        key=spec.name,
                    )
                )
            fired.append((spec.name, slot))
        if not outs:
            return
        await writer.write(outs)  # all or nothing: a slot is fired and recorded together
        for name, slot in fired:
            self._last[name] = slot
            self.fired[name] = self.fired.get(name, 0) + 1
            metrics.FIRINGS.labels(name).inc()
            log.info("cron trigger %s fired slot %d", name, slot)

    def status(self, spec: TriggerSpec) -> TriggerStatus:
        last = self.last_fired(spec.name)
        following: int | None = None
        if spec.cron and not spec.paused:
            try:
                following = schedule.next_slot(spec.cron, spec.timezone, max(now_ms(), last or 0))
            except schedule.ScheduleError:
                following = None
        state = "paused" if spec.paused else ("running" if self.role == "active" else "standby")
        return TriggerStatus(
            trigger=spec.name,
            instance=self.settings.instance_name,
            state=state,  # type: ignore[arg-type]
            fired=self.fired.get(spec.name, 0),
            last_fired_ms=last,
            next_fire_ms=following,
        )
