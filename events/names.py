"""The name registry: which kind of invocable (function or workflow) a name belongs to."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from events.base import Record, now_ms


class NameClaimed(Record):
    """A creator claims ``name`` for a function or a workflow (see ``services.common.names``)."""

    type: Literal["name.claimed"] = "name.claimed"
    name: str
    kind: Literal["function", "workflow"]
    at_ms: int = Field(default_factory=now_ms)
