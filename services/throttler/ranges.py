"""Normal ranges: the platform-wide one learned from the population, and each function's own.

The platform-wide upper bound is a robust statistic (median + k·MAD) over a sliding window of every
instance's figures, held between a configured floor and ceiling: the floor keeps an idle cluster
from calling everything abnormal, the ceiling keeps one heavy function from making itself normal.
A function's own baseline (the same statistic over its own recent, normal samples) catches a
function that suddenly behaves differently; until it has enough samples, the platform range judges.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RangeConfig:
    window: int = 600
    """Samples kept per series (one sample per instance per interval)."""
    k: float = 5.0
    """How many MADs above the median is still normal."""
    cpu_floor: float = 300.0
    cpu_ceiling: float = 800.0
    memory_floor: float = 128.0
    memory_ceiling: float = 512.0
    baseline_min_samples: int = 30
    baseline_margin: float = 2.0
    """A function's own bound is at least this times its median (small noise is not a change)."""


def robust_upper(samples: deque[float] | list[float], k: float) -> float:
    """median + k·MAD (scaled to a standard deviation for normal data)."""
    if not samples:
        return 0.0
    median = statistics.median(samples)
    mad = statistics.median(abs(x - median) for x in samples) * 1.4826
    return median + k * mad


@dataclass
class Series:
    """A sliding window of one figure."""

    size: int
    values: deque[float] = field(default_factory=deque)

    def add(self, value: float) -> None:
        self.values.append(value)
        while len(self.values) > self.size:
            self.values.popleft()


@dataclass(frozen=True)
class Bounds:
    cpu_millis: float
    memory_mb: float
    source: str
    """Where the bounds come from: ``platform``, ``function baseline`` or ``function spec``."""


class NormalRanges:
    """Learns the platform's and each function's normal CPU and memory."""

    def __init__(self, config: RangeConfig) -> None:
        self.config = config
        self.cpu = Series(config.window)
        self.memory = Series(config.window)
        self.fn_cpu: dict[str, Series] = {}
        self.fn_memory: dict[str, Series] = {}

    def learn(self, function: str | None, cpu_millis: float, memory_mb: float, *, outlier: bool) -> None:
        """Add one sample; outliers feed the population (that is what the ceiling is for) but not a
        function's own baseline, so an abnormal function cannot teach itself that it is normal."""
        self.cpu.add(cpu_millis)
        self.memory.add(memory_mb)
        if function is None or outlier:
            return
        self.fn_cpu.setdefault(function, Series(self.config.window)).add(cpu_millis)
        self.fn_memory.setdefault(function, Series(self.config.window)).add(memory_mb)

    def platform(self) -> Bounds:
        c = self.config
        cpu = min(c.cpu_ceiling, max(c.cpu_floor, robust_upper(self.cpu.values, c.k)))
        memory = min(c.memory_ceiling, max(c.memory_floor, robust_upper(self.memory.values, c.k)))
        return Bounds(cpu, memory, "platform")

    def for_function(
        self, function: str | None, spec_cpu: float | None = None, spec_memory: float | None = None
    ) -> Bounds:
        """The bounds that judge ``function`` now."""
        platform = self.platform()
        if spec_cpu is not None or spec_memory is not None:
            return Bounds(
                spec_cpu if spec_cpu is not None else platform.cpu_millis,
                spec_memory if spec_memory is not None else platform.memory_mb,
                "function spec",
            )
        cpu_series = self.fn_cpu.get(function or "")
        if cpu_series is None or len(cpu_series.values) < self.config.baseline_min_samples:
            return platform
        mem_series = self.fn_memory[function or ""]
        c = self.config
        # A function's own baseline may only be stricter than the platform's range, never laxer.
        own_cpu = max(
            c.cpu_floor / 2,
            robust_upper(cpu_series.values, c.k),
            statistics.median(cpu_series.values) * c.baseline_margin,
        )
        own_memory = max(
            c.memory_floor / 2,
            robust_upper(mem_series.values, c.k),
            statistics.median(mem_series.values) * c.baseline_margin,
        )
        return Bounds(min(own_cpu, platform.cpu_millis), min(own_memory, platform.memory_mb), "function baseline")
