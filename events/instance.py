"""The instance family: lifecycle events agents publish on the ``instance`` topic (key = node)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from events.base import Record, now_ms

InstanceState = Literal["starting", "generic", "specializing", "ready", "busy", "recycling", "gone"]


class InstanceChanged(Record):
    """An instance entered ``state``."""

    type: Literal["instance.changed"] = "instance.changed"
    node: str
    incarnation: str
    instance: str
    state: InstanceState
    pid: int | None = None
    function: str | None = None
    function_version: str | None = None
    uses: int = 0
    reason: str = ""
    """Why it changed, for the states where that matters (recycling, gone)."""
    at_ms: int = Field(default_factory=now_ms)
