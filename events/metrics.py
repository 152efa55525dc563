"""The metrics family: per-instance cgroup figures each node publishes every interval, and what
the throttler decides from them (on ``node-metric`` and ``throttle``; key = node / function)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from events.base import Record, now_ms


class InstanceMetrics(BaseModel):
    """One instance over the last interval."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    instance: str
    function: str | None = None
    function_version: str | None = None
    state: str = ""
    cpu_millis: float = 0.0
    """CPU used over the interval, in millicores (1000 = one core busy the whole interval)."""
    memory_mb: float = 0.0
    pids: int = 0
    throttled_ms: float = 0.0
    """Time the CPU quota held the instance back during the interval."""
    cpu_quota_millis: int | None = None
    """The quota in force (``None``: no cgroup or unlimited)."""
    clamped: bool = False


class NodeMetrics(Record):
    """Every instance of one node over one interval, and the node's totals."""

    type: Literal["node.metrics"] = "node.metrics"
    node: str
    incarnation: str
    interval_ms: int
    instances: list[InstanceMetrics] = Field(default_factory=list)
    cpu_millis: float = 0.0
    memory_mb: float = 0.0
    at_ms: int = Field(default_factory=now_ms)


class ThrottleDecided(Record):
    """The throttler acted (or released), with the figures and the rule that triggered it."""

    type: Literal["throttle.decided"] = "throttle.decided"
    function: str
    action: Literal["clamp", "isolate", "kill", "release-clamp", "release-isolation"]
    node: str | None = None
    instance: str | None = None
    rule: str
    """Which bound was crossed, e.g. ``cpu 1950m > 600m for 3 intervals (platform range)``."""
    figures: dict[str, float] = Field(default_factory=dict)
    at_ms: int = Field(default_factory=now_ms)
