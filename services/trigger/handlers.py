"""The trigger service's handlers: what each record it reads leads to (thin; the work is in the core)."""

from __future__ import annotations

from events import InvocationCompleted
from events.triggers import TriggerSpec
from services.trigger.core import Triggers


def on_trigger_spec(core: Triggers, name: str, spec: TriggerSpec | None) -> None:
    """A trigger was created, changed, paused, resumed (a new spec) or deleted (None)."""
    core.on_spec(name, spec)


def on_result(core: Triggers, result: InvocationCompleted) -> None:
    """A topic trigger's invocation ended (the reader passes only ``trg.`` ids)."""
    core.book.on_result(result)
