"""Keep-alive policies: how long an idle instance stays loaded, and when to pre-warm one.

The ``hybrid`` policy is the hybrid-histogram policy of M. Shahrad, R. Fonseca, Í. Goiri, G. Chaudhry,
P. Batum, J. Cooke, E. Laureano, C. Tresness, M. Russinovich and R. Bianchini, "Serverless in the
Wild: Characterizing and Optimizing the Serverless Workload at a Large Cloud Provider", USENIX ATC
2020 (section 4.2). Per function it keeps a histogram of idle times (from the end of one invocation
to the start of the next) in 1-minute bins over a limited range (4 hours). When the histogram is
representative, the instance is unloaded right after an invocation, pre-warmed shortly before the
head (5th percentile) of the idle times, and kept loaded until shortly after the tail (99th
percentile); both windows get a 10% margin. When it is not representative (too few idle times, too
many beyond the range, or no prominent pattern), the policy falls back to a fixed, generous
keep-alive with no pre-warm. Where the paper forecasts out-of-range idle times with ARIMA, this
module takes the same fallback: a forecaster would be a model to fit per function in the pool
manager, for the few functions invoked less often than every four hours.

The ``fixed`` policy is the state of practice the paper compares against: keep every instance loaded
for a fixed time after each invocation.

Pure logic: no Kafka, no I/O, no clock. The pool manager feeds arrivals in and turns decisions into
prewarm and recycle commands (:meth:`KeepAliveDecision.wants_loaded` says which, at a given idle time).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate
from typing import Protocol

__all__ = [
    "DEFAULT_BIN_S",
    "DEFAULT_RANGE_S",
    "FixedPolicy",
    "HybridPolicy",
    "IdleHistogram",
    "KeepAliveDecision",
    "KeepAlivePolicy",
    "policy_from_config",
]

DEFAULT_RANGE_S: float = 4 * 3600.0
"""Idle times the histogram bins (the paper's 4 hours); longer ones only count as out of bounds."""

DEFAULT_BIN_S: float = 60.0
"""Bin width: the paper's 1 minute, also the granularity of the Azure Functions trace."""


class IdleHistogram:
    """A range-limited histogram of one function's idle times.

    Bin ``i`` counts idle times in ``[i * bin_s, (i + 1) * bin_s)``; an idle time of ``range_s`` or
    more only increments :attr:`out_of_bounds`. Memory is constant (``range_s / bin_s`` counters),
    so the pool manager can hold one per function.
    """

    __slots__ = ("range_s", "bin_s", "bins", "count", "out_of_bounds", "_sum_sq", "_last_end_s")

    def __init__(self, range_s: float = DEFAULT_RANGE_S, bin_s: float = DEFAULT_BIN_S) -> None:
        if bin_s <= 0 or range_s < bin_s:
            raise ValueError(f"need 0 < bin_s <= range_s, got bin_s={bin_s}, range_s={range_s}")
        n_bins = round(range_s / bin_s)
        if not math.isclose(n_bins * bin_s, range_s):
            raise ValueError(f"range_s={range_s} is not a whole number of bins of {bin_s}s")
        self.range_s = range_s
        """Upper bound (exclusive) of the idle times that are binned."""
        self.bin_s = bin_s
        """Width of one bin, seconds."""
        self.bins = [0] * n_bins
        """Count of idle times per bin."""
        self.count = 0
        """Idle times within the range (the sum of :attr:`bins`)."""
        self.out_of_bounds = 0
        """Idle times of ``range_s`` or more."""
        # Sum of squared bin counts, kept up to date so the CV costs O(1) per decision.
        self._sum_sq = 0
        self._last_end_s: float | None = None

    @property
    def total(self) -> int:
        """Every idle time recorded, within the range or not."""
        return self.count + self.out_of_bounds

    @property
    def out_of_bounds_share(self) -> float:
        """Share (0..1) of the idle times that were out of bounds; 0 with no idle times."""
        total = self.count + self.out_of_bounds
        return self.out_of_bounds / total if total else 0.0

    @property
    def cv(self) -> float:
        """Coefficient of variation of the bin counts (population standard deviation / mean).

        High when the idle times fall into a few bins (a pattern worth predicting), near 0 when they
        spread evenly over the range; 0 for an empty histogram.
        """
        if self.count == 0:
            return 0.0
        n = len(self.bins)
        mean = self.count / n
        variance = max(0.0, self._sum_sq / n - mean * mean)  # max(): float rounding near 0
        return math.sqrt(variance) / mean

    def record_arrival(self, t_s: float, duration_s: float = 0.0) -> float | None:
        """Note an invocation that starts at ``t_s`` and runs ``duration_s``; returns the idle time recorded.

        The idle time is from the end of the latest-ending earlier invocation to ``t_s`` (0 when
        they overlap); the first arrival records none and returns ``None``. With ``duration_s=0``
        the idle times are the inter-arrival times.
        """
        last_end = self._last_end_s
        idle: float | None = None
        if last_end is not None:
            idle = t_s - last_end if t_s > last_end else 0.0
            self.record_idle(idle)
        end = t_s + duration_s
        if last_end is None or end > last_end:
            self._last_end_s = end
        return idle

    def record_idle(self, idle_s: float) -> None:
        """Add one idle time (seconds, >= 0) to the histogram."""
        if idle_s < 0:
            raise ValueError(f"idle time must be >= 0, got {idle_s}")
        i = int(idle_s // self.bin_s)
        if i >= len(self.bins):
            self.out_of_bounds += 1
            return
        c = self.bins[i]
        self.bins[i] = c + 1
        self._sum_sq += 2 * c + 1  # (c + 1)^2 - c^2
        self.count += 1

    def percentile_bins(self, *pcts: float) -> list[int]:
        """Nearest-rank percentiles (0..100) of the binned idle times, as bin indexes.

        Out-of-bounds idle times are not ranked, as in the paper: the percentiles describe the
        histogram, and :meth:`unrepresentative_reason` decides whether it may be trusted.
        """
        if self.count == 0:
            raise ValueError("no idle times within the range")
        cum = list(accumulate(self.bins))  # one pass in C, shared by every percentile asked for
        out = []
        for p in pcts:
            if not 0 <= p <= 100:
                raise ValueError(f"percentile must be within 0..100, got {p}")
            rank = max(1, math.ceil(p * self.count / 100 - 1e-9))  # 1e-9: 99 * 100 / 100 is not always 99
            out.append(bisect_left(cum, rank))
        return out

    def head_s(self, pct: float) -> float:
        """Lower edge of the bin holding the ``pct`` percentile: idle times before it are rarer than ``pct``."""
        return self.percentile_bins(pct)[0] * self.bin_s

    def tail_s(self, pct: float) -> float:
        """Upper edge of the bin holding the ``pct`` percentile: idle times beyond it are rarer than 100-``pct``."""
        return (self.percentile_bins(pct)[0] + 1) * self.bin_s

    def unrepresentative_reason(self, min_samples: int, max_out_of_bounds_share: float, min_cv: float) -> str | None:
        """Why the histogram should not be trusted for prediction, or ``None`` when it may be.

        Checked in order: fewer than ``min_samples`` idle times (a new or rare function); an
        out-of-bounds share of ``max_out_of_bounds_share`` or more (the function's idle times mostly
        exceed the range); a CV of the bin counts below ``min_cv`` (idle times spread out, no
        prominent pattern).
        """
        total = self.count + self.out_of_bounds
        if total < min_samples:
            return f"too few idle times ({total} < {min_samples})"
        oob = self.out_of_bounds / total
        if oob >= max_out_of_bounds_share:
            return f"out of bounds ({oob:.0%} of idle times >= {self.range_s / 60:g} min)"
        cv = self.cv
        if cv < min_cv:
            return f"no pattern (CV {cv:.2f} < {min_cv:g})"
        return None


@dataclass(frozen=True, slots=True)
class KeepAliveDecision:
    """What to do with a function's instance once an invocation has ended."""

    prewarm_after_s: float
    """Seconds after the invocation ends at which to load (pre-warm) the instance again; before
    that it is unloaded. 0: do not unload, keep it loaded from the end of the invocation."""
    keep_alive_s: float
    """Seconds to keep the instance loaded from ``prewarm_after_s`` on (from the end of the
    invocation when that is 0); after that it is recycled."""
    reason: str
    """Why, for the event that carries the decision and for people reading it."""

    @property
    def unload_after_s(self) -> float:
        """Seconds after the invocation ends at which the instance is recycled if still idle."""
        return self.prewarm_after_s + self.keep_alive_s

    def wants_loaded(self, idle_s: float) -> bool:
        """Whether an instance should be loaded ``idle_s`` seconds after the invocation ended.

        The pool manager recycles a loaded instance for which this is false and pre-warms one for
        a function without an instance for which it is true.
        """
        if self.prewarm_after_s <= 0:
            return idle_s <= self.keep_alive_s
        return self.prewarm_after_s <= idle_s <= self.prewarm_after_s + self.keep_alive_s


class KeepAlivePolicy(Protocol):
    """A keep-alive policy: decides from a function's idle-time histogram."""

    @property
    def name(self) -> str:
        """Short name, as configured (``fixed`` or ``hybrid``)."""
        ...

    def new_histogram(self) -> IdleHistogram:
        """An empty histogram of the shape this policy reads."""
        ...

    def decide(self, hist: IdleHistogram) -> KeepAliveDecision:
        """The decision for the function whose idle times ``hist`` holds, after an invocation ends."""
        ...


@dataclass(frozen=True)
class FixedPolicy:
    """Keep every instance loaded for ``keep_alive_s`` after each invocation; never pre-warm."""

    keep_alive_s: float = 600.0
    """Keep-alive after each invocation, seconds (AWS Lambda's 10 minutes by default)."""

    def __post_init__(self) -> None:
        if self.keep_alive_s < 0:
            raise ValueError(f"keep_alive_s must be >= 0, got {self.keep_alive_s}")

    @cached_property
    def _decision(self) -> KeepAliveDecision:
        # One shared decision: it never changes, and it is asked for after every invocation.
        return KeepAliveDecision(0.0, self.keep_alive_s, f"fixed keep-alive {self.keep_alive_s:g}s")

    @property
    def name(self) -> str:
        """``fixed``."""
        return "fixed"

    def new_histogram(self) -> IdleHistogram:
        """A default histogram; this policy does not read it."""
        return IdleHistogram()

    def decide(self, hist: IdleHistogram) -> KeepAliveDecision:
        """The fixed keep-alive, whatever the histogram holds."""
        return self._decision


@dataclass(frozen=True)
class HybridPolicy:
    """The hybrid-histogram policy of Shahrad et al. (ATC 2020), without its ARIMA branch."""

    range_s: float = DEFAULT_RANGE_S
    """Range of the histogram: idle times beyond it are out of bounds."""
    bin_s: float = DEFAULT_BIN_S
    """Histogram bin width."""
    head_pct: float = 5.0
    """Percentile of idle times that sets the pre-warm point."""
    tail_pct: float = 99.0
    """Percentile of idle times that sets the end of the keep-alive window."""
    margin: float = 0.10
    """Safety margin: the pre-warm point comes this share earlier, the unload point this share later."""
    fallback_keep_alive_s: float = DEFAULT_RANGE_S
    """Keep-alive when the histogram is not representative: generous, as in the paper (the range)."""
    min_samples: int = 5
    """Idle times needed before the histogram is trusted; until then, the fallback."""
    min_cv: float = 2.0
    """CV of the bin counts below which idle times show no pattern (the paper's threshold, 2)."""
    max_out_of_bounds_share: float = 0.5
    """Share of out-of-bounds idle times from which the histogram is not used (the paper hands these
    functions to ARIMA; here they get the fallback)."""

    def __post_init__(self) -> None:
        if not 0 <= self.head_pct <= self.tail_pct <= 100:
            raise ValueError(f"need 0 <= head_pct <= tail_pct <= 100, got {self.head_pct}, {self.tail_pct}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must be within [0, 1), got {self.margin}")
        if self.fallback_keep_alive_s < 0 or self.min_samples < 1:
            raise ValueError("fallback_keep_alive_s must be >= 0 and min_samples >= 1")
        IdleHistogram(self.range_s, self.bin_s)  # validates the shape once, here, not per function

    @property
    def name(self) -> str:
        """``hybrid``."""
        return "hybrid"

    def new_histogram(self) -> IdleHistogram:
        """An empty histogram with this policy's range and bin width."""
        return IdleHistogram(self.range_s, self.bin_s)

    def decide(self, hist: IdleHistogram) -> KeepAliveDecision:
        """Pre-warm at the head percentile minus the margin; unload at the tail percentile plus the margin.

        ``keep_alive_s`` counts from the pre-warm point, so it is the tail window minus the
        pre-warm window. A head in the first bin gives ``prewarm_after_s == 0``: the instance is
        not unloaded after the invocation.
        """
        if hist.bin_s != self.bin_s or hist.range_s != self.range_s:
            raise ValueError("histogram shape differs from the policy's; make it with new_histogram()")
        why_not = hist.unrepresentative_reason(self.min_samples, self.max_out_of_bounds_share, self.min_cv)
        if why_not is not None:
            return KeepAliveDecision(0.0, self.fallback_keep_alive_s, f"fallback: {why_not}")
        head_bin, tail_bin = hist.percentile_bins(self.head_pct, self.tail_pct)
        # Lower edge of the head bin, upper edge of the tail bin: both round towards keeping the
        # instance loaded, since a cold start costs a user-visible delay and idle time only memory.
        head_s = head_bin * self.bin_s
        tail_s = (tail_bin + 1) * self.bin_s
        prewarm_s = head_s * (1 - self.margin)
        keep_s = tail_s * (1 + self.margin) - prewarm_s
        return KeepAliveDecision(
            prewarm_s, keep_s, f"histogram (p{self.head_pct:g} {head_s:g}s, p{self.tail_pct:g} {tail_s:g}s)"
        )


def policy_from_config(kind: str, fixed_s: float) -> FixedPolicy | HybridPolicy:
    """The policy a pool manager is configured with: ``fixed`` (keep-alive ``fixed_s``) or ``hybrid``.

    ``fixed_s`` only applies to ``fixed``; ``hybrid`` uses the paper's parameters, with the
    histogram range as its fallback keep-alive.
    """
    normalized = kind.strip().lower()
    if normalized == "fixed":
        return FixedPolicy(fixed_s)
    if normalized == "hybrid":
        return HybridPolicy()
    raise ValueError(f"unknown keep-alive policy {kind!r}: expected 'fixed' or 'hybrid'")
