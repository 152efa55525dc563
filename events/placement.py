"""The placement family: where a function's instances may run, and overrides of it.

Kubernetes rules: a function runs on a node when its node selector matches the node's labels
and it tolerates every NoSchedule and NoExecute taint of the node.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from events.base import Record, now_ms

ROLE = "stoker.io/role"
DEDICATED = "stoker.io/dedicated"


class Toleration(BaseModel):
    """A Kubernetes toleration."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    key: str = ""
    """Empty with operator Exists: tolerates every taint."""
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str = ""
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = ""
    """Empty: every effect."""


RUNTIME_TOLERATION = Toleration(key=DEDICATED, operator="Equal", value="runtime", effect="NoSchedule")
ISOLATED_TOLERATION = Toleration(key=DEDICATED, operator="Equal", value="isolated", effect="NoSchedule")


class PlacementOverride(Record):
    """Placement of a function changed for a while (compacted ``placement`` topic, key = function).

    While in force, the function's instances go only where ``node_selector`` and ``tolerations``
    allow (isolation: the isolated nodes); a tombstone or ``until_ms`` in the past ends it.
    """

    type: Literal["placement.override"] = "placement.override"
    function: str
    node_selector: dict[str, str] = Field(default_factory=lambda: {ROLE: "isolated"})
    tolerations: list[Toleration] = Field(default_factory=lambda: [ISOLATED_TOLERATION])
    until_ms: int | None = None
    reason: str = ""
    by: str = ""
    """Who decided: ``throttler`` or ``user``."""
    at_ms: int = Field(default_factory=now_ms)

    def active(self, at_ms: int) -> bool:
        return self.until_ms is None or at_ms < self.until_ms
