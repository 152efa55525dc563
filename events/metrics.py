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
    cpu_wait_ms: float | None = None
    """Time at least one of the instance's tasks was runnable but waited for a CPU during the
    interval (cgroup v2 ``cpu.pressure`` ``some`` total); ``None`` where the kernel does not say
    (cgroup v1, or v2 without PSI). Like every field added later, defaulted: older readers ignore it."""
    nr_throttled: int | None = None
    """CPU quota periods in which the instance was held back during the interval (``cpu.stat``
    ``nr_throttled``); ``None`` from an older agent."""


class NodeCpuPressure(BaseModel):
    """How much runnable work waited for a CPU on the node (a later, defaulted field of ``node.metrics``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    source: Literal["psi", "run queue"]
    """``psi``: the kernel's pressure stall information (``/proc/pressure/cpu``, cgroup v2 hosts
    and v1 ones booted with PSI); ``run queue``: only ``/proc/stat`` and ``/proc/loadavg``."""
    cpu_some_avg10: float | None = None
    """PSI ``some`` avg10: share (0..100) of the last 10 s in which at least one task waited for a CPU."""
    procs_running: int | None = None
    """Tasks running or runnable when sampled (``/proc/stat``), the sampler itself not counted."""
    load1: float | None = None
    """One-minute load average (``/proc/loadavg``)."""
    cores: int = 1
    """CPUs of the host, to read ``procs_running`` and ``load1`` against."""


class NodeMetrics(Record):
    """Every instance of one node over one interval, and the node's totals."""

    type: Literal["node.metrics"] = "node.metrics"
    node: str
    incarnation: str
    interval_ms: int
    instances: list[InstanceMetrics] = Field(default_factory=list)
    cpu_millis: float = 0.0
    memory_mb: float = 0.0
    pressure: NodeCpuPressure | None = None
    """The node's CPU pressure when the interval was sampled; ``None``: not known (an older agent)."""
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
