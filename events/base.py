"""The base of every Stoker event and command.

Every record on a Stoker topic is a JSON object with a ``type`` (past tense for events,
imperative for commands) and a ``version``. Models are frozen; fields added later always get
defaults, and unknown fields are ignored, so old and new services can share a topic.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    """Base class of all topic records (events and commands)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    type: str
    """Discriminator: which model this record is, e.g. ``invocation.requested``."""
    version: int = 1
    """Schema version of the model named by ``type``."""


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds, the unit of every timestamp on the wire."""
    return int(time.time() * 1000)
