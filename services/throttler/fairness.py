"""Per function per node: what each function takes of a node, its fair share, and node pressure.

An instance's own figures cannot see a function whose instances each stay modest while together
they take the node (many short concurrent spinners); nor can they tell a function that is busy
on a node nobody else needs from one that makes others wait. This module sums each function's
instances on a node (CPU, memory, pids, throttled time) and judges the sum against the node's
capacity split evenly among the functions active there, and it reads the node's pressure (cgroup
v2 PSI, ``/proc/pressure/cpu``, where the kernel has it; otherwise the run queue of ``/proc/stat``
against the cores) to tell "busy" from "hurting others".

Pure logic, apart from :func:`read_host_pressure` (a few ``/proc`` reads, for whoever runs on the
node: the agent, or the throttler of an embedded platform whose nodes share its host).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from events import InstanceMetrics, NodeMetrics

__all__ = [
    "FairnessConfig",
    "FunctionUsage",
    "NodeCapacity",
    "NodePressure",
    "Verdict",
    "judge_node",
    "parse_procs_running",
    "parse_psi_some_avg10",
    "pressure_of",
    "read_host_pressure",
    "usage_by_function",
]

JUDGED_STATES = frozenset({"busy", "ready"})
"""Instance states that hold user code (generic instances run none)."""


@dataclass(frozen=True)
class NodePressure:
    """How much runnable work waits for a CPU on a node, over about the last interval."""

    cpu_some_pct: float | None = None
    """PSI ``some`` avg10 of ``/proc/pressure/cpu``: share of time at least one task waited (0..100)."""
    runnable: int | None = None
    """Tasks running or waiting to run (``procs_running`` of ``/proc/stat``): the v1 fallback."""
    cores: int = 1
    """CPUs of the node, to read ``runnable`` against."""
    source: str = ""
    """Where the figures come from (``psi``, ``run queue``), for the decision's reason."""


@dataclass(frozen=True)
class NodeCapacity:
    """What a node offers (the heartbeat's capacity) and, when known, its pressure."""

    cpu_millis: float = 2000.0
    memory_mb: float = 4096.0
    pids: int = 4096
    """Processes the node gives its functions together (the kernel's are many more; this is the budget)."""
    pressure: NodePressure | None = None


@dataclass(frozen=True)
class FairnessConfig:
    active_cpu_millis: float = 10.0
    """A function using at least this (or with a busy instance) is active on the node: it needs the CPU now."""
    slack: float = 0.2
    """Over its fair share by more than this share before it counts as taking more than it."""
    min_cpu_millis: float = 500.0
    """Below this a function never hogs the CPU, whatever its share (a node of tiny functions)."""
    min_memory_mb: float = 256.0
    min_pids: int = 64
    """A function's pids over this many on one node while others are active: a fork-heavy function."""
    psi_some_pct: float = 10.0
    """PSI ``some`` avg10 from which the node counts as under CPU pressure."""
    runnable_per_core: float = 1.5
    """Without PSI: runnable tasks per core from which the node counts as under pressure."""
    saturated_share: float = 0.9
    """Without any pressure figure: the functions' CPU over this share of the node's capacity is pressure."""


@dataclass(frozen=True)
class FunctionUsage:
    """One function's instances on one node over one interval, summed."""

    function: str
    instances: tuple[str, ...] = ()
    cpu_millis: float = 0.0
    memory_mb: float = 0.0
    pids: int = 0
    throttled_ms: float = 0.0
    busy: int = 0
    """Instances busy when the interval was sampled."""
    unclamped: tuple[str, ...] = ()
    """Instances whose CPU quota the throttler has not clamped."""
    wait_ms: float | None = None
    """Time its instances' tasks waited for a CPU (cgroup v2 PSI of each instance, summed);
    ``None`` when no instance's figure is known (cgroup v1)."""
    throttled_periods: int = 0
    """Quota periods in which its instances were held back (``nr_throttled``), summed."""


def usage_by_function(instances: Iterable[InstanceMetrics]) -> dict[str, FunctionUsage]:
    """Every function's sum over its instances (those holding user code) in ``instances``."""
    by: dict[str, list[InstanceMetrics]] = {}
    for m in instances:
        if m.function is not None and m.state in JUDGED_STATES:
            by.setdefault(m.function, []).append(m)
    return {
        name: FunctionUsage(
            name,
            tuple(m.instance for m in ms),
            round(sum(m.cpu_millis for m in ms), 1),
            round(sum(m.memory_mb for m in ms), 1),
            sum(m.pids for m in ms),
            round(sum(m.throttled_ms for m in ms), 1),
            sum(1 for m in ms if m.state == "busy"),
            tuple(m.instance for m in ms if not m.clamped),
            _sum_known(m.cpu_wait_ms for m in ms),
            sum(m.nr_throttled or 0 for m in ms),
        )
        for name, ms in by.items()
    }


def _sum_known(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(known), 1) if known else None


def pressure_of(metrics: NodeMetrics) -> NodePressure | None:
    """The pressure the node's agent sampled with its metrics, or ``None`` (an agent that sends none)."""
    p = metrics.pressure
    if p is None:
        return None
    return NodePressure(p.cpu_some_avg10, p.procs_running, max(1, p.cores), p.source)


@dataclass(frozen=True)
class Verdict:
    """What one function does to the others on one node in one interval."""

    function: str
    usage: FunctionUsage
    others_active: tuple[str, ...]
    """Other functions that needed the node in the interval."""
    pressure: bool | None
    """Whether work waited for a CPU on the node; ``None`` when no pressure figure was known."""
    hogging: list[str] = field(default_factory=list)
    """What it takes more than its share of (``cpu``, ``memory``, ``pids``), each with its figures."""
    cpu_fair_millis: float = 0.0
    """Its fair share of the node's CPU: split evenly among the active functions, of the node's
    capacity, or under pressure of the CPU its functions got (what there is to share)."""
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def hurting_others(self) -> bool:
        """Takes more than its share of something while other functions need the node (and, for
        CPU, while work waits for a CPU)."""
        return bool(self.hogging)

    @property
    def busy_alone(self) -> bool:
        """Known not to hurt anyone: no other function needs the node, or nothing waits for a CPU."""
        return not self.others_active or self.pressure is False


def _pressure(node: NodeCapacity, used_cpu: float, c: FairnessConfig) -> tuple[bool | None, str]:
    p = node.pressure
    if p is not None and p.cpu_some_pct is not None:
        return p.cpu_some_pct >= c.psi_some_pct, f"psi cpu some {p.cpu_some_pct:.0f}%"
    if p is not None and p.runnable is not None:
        per_core = p.runnable / max(1, p.cores)
        return per_core >= c.runnable_per_core, f"run queue {p.runnable} on {p.cores} cores"
    if used_cpu >= c.saturated_share * node.cpu_millis:
        return True, f"node cpu {used_cpu:.0f}m of {node.cpu_millis:.0f}m"
    return None, ""


def judge_node(metrics: NodeMetrics, node: NodeCapacity, config: FairnessConfig) -> dict[str, Verdict]:
    """Per function on the node: its usage, who else needs the node, and what it hogs."""
    c = config
    usages = usage_by_function(metrics.instances)
    interval_s = max(1, metrics.interval_ms) / 1000
    active = [u.function for u in usages.values() if u.cpu_millis >= c.active_cpu_millis or u.busy > 0]
    used_cpu = sum(u.cpu_millis for u in usages.values())
    pressure, pressure_reason = _pressure(node, used_cpu, c)
    n_active = max(1, len(active))
    # Under pressure the CPU the node's functions got is what there is to share (a shared or
    # overcommitted host gives less than the node's nominal capacity); otherwise the capacity.
    cpu_pool = min(node.cpu_millis, used_cpu) if pressure else node.cpu_millis
    cpu_fair = cpu_pool / n_active
    memory_fair = node.memory_mb / n_active
    pids_fair = node.pids / n_active
    out: dict[str, Verdict] = {}
    for name, u in usages.items():
        others = tuple(sorted(f for f in active if f != name))
        hogging: list[str] = []
        if others:
            # Demand, not use: a clamped function's throttled time is CPU it asked for and was refused.
            demand = u.cpu_millis + u.throttled_ms / interval_s
            if pressure is not False and u.cpu_millis >= c.min_cpu_millis and demand > cpu_fair * (1 + c.slack):
                # Without any pressure figure the node's saturation decides (in _pressure); a
                # known lack of pressure means the CPU is there for the taking.
                if pressure:
                    hogging.append(
                        f"cpu {u.cpu_millis:.0f}m (wants {demand:.0f}m) over its fair share {cpu_fair:.0f}m "
                        f"of {cpu_pool:.0f}m with {len(others)} other function(s) active, {pressure_reason}"
                    )
            if u.memory_mb >= c.min_memory_mb and u.memory_mb > memory_fair * (1 + c.slack):
                hogging.append(
                    f"memory {u.memory_mb:.0f}MB over its fair share {memory_fair:.0f}MB of {node.memory_mb:.0f}MB "
                    f"with {len(others)} other function(s) active"
                )
            pids_bound = min(float(c.min_pids), pids_fair * (1 + c.slack))
            if u.pids > pids_bound:
                hogging.append(
                    f"{u.pids} pids over {pids_bound:.0f} on the node with {len(others)} other function(s) active"
                )
        out[name] = Verdict(
            name,
            u,
            others,
            pressure,
            hogging,
            cpu_fair,
            {
                "fn_cpu_millis": u.cpu_millis,
                "fn_memory_mb": u.memory_mb,
                "fn_pids": float(u.pids),
                "fn_throttled_ms": u.throttled_ms,
                "fn_instances": float(len(u.instances)),
                "cpu_fair_millis": round(cpu_fair, 1),
                "node_cpu_millis": round(used_cpu, 1),
                "node_capacity_millis": node.cpu_millis,
                "active_functions": float(len(active)),
                **_wait_figures(u, [usages[f] for f in others]),
                **_pressure_figures(node.pressure),
            },
        )
    return out


def _wait_figures(own: FunctionUsage, others: list[FunctionUsage]) -> dict[str, float]:
    out: dict[str, float] = {}
    if own.wait_ms is not None:
        out["fn_cpu_wait_ms"] = own.wait_ms
    waits = [o.wait_ms for o in others if o.wait_ms is not None]
    if waits:
        out["others_cpu_wait_ms"] = round(sum(waits), 1)
    if own.throttled_periods:
        out["fn_throttled_periods"] = float(own.throttled_periods)
    return out


def _pressure_figures(p: NodePressure | None) -> dict[str, float]:
    if p is None:
        return {}
    out: dict[str, float] = {"cores": float(p.cores)}
    if p.cpu_some_pct is not None:
        out["psi_cpu_some_pct"] = p.cpu_some_pct
    if p.runnable is not None:
        out["runnable"] = float(p.runnable)
    return out


# --- reading a host's pressure ----------------------------------------------------------------------


def parse_psi_some_avg10(text: str) -> float | None:
    """``avg10`` of the ``some`` line of a PSI file (``/proc/pressure/cpu``), or None."""
    for line in text.splitlines():
        if line.startswith("some "):
            for part in line.split()[1:]:
                key, _, value = part.partition("=")
                if key == "avg10":
                    return float(value)
    return None


def parse_procs_running(text: str) -> int | None:
    """``procs_running`` of ``/proc/stat`` (runnable tasks now, the run queue), or None."""
    for line in text.splitlines():
        if line.startswith("procs_running "):
            return int(line.split()[1])
    return None


def read_host_pressure(proc: Path = Path("/proc"), cores: int | None = None) -> NodePressure:
    """This host's CPU pressure: PSI where the kernel has it, the run queue always."""
    n = cores or os.cpu_count() or 1
    psi: float | None = None
    try:
        psi = parse_psi_some_avg10((proc / "pressure" / "cpu").read_text())
    except OSError:
        pass  # no PSI (kernel without it, or psi=0): the run queue says it
    runnable: int | None = None
    try:
        runnable = parse_procs_running((proc / "stat").read_text())
    except OSError:
        pass
    return NodePressure(psi, runnable, n, "psi" if psi is not None else "run queue")
