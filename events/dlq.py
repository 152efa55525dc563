"""Dead letters: records a consumer could not use, kept with where they came from and why."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from events.base import Record, now_ms


class DeadLettered(Record):
    """A record was taken off its topic without being processed."""

    type: Literal["record.dead-lettered"] = "record.dead-lettered"
    source_topic: str
    partition: int
    offset: int
    key: str | None = None
    reason: str
    value: str
    """The original value, decoded as UTF-8 with replacement characters (see ``value_b64``)."""
    value_b64: str | None = None
    """The exact original bytes, base64, when they were not valid UTF-8."""
    consumer: str = ""
    at_ms: int = Field(default_factory=now_ms)
