"""Keep-alive policies: how long an idle instance stays loaded, and when to pre-warm one.

The ``hybrid`` policy is the hybrid-histogram policy of M. Shahrad, R. Fonseca, Í. Goiri, G. Chaudhry,
P. Batum, J. Cooke, E. Laureano, C. Tresness, M. Russinovich and R. Bianchini, "Serverless in the
Wild: Characterizing and Optimizing the Serverless Workload at a Large Cloud Provider", USENIX ATC
2020 (section 4.2). Per function it keeps a histogram of idle times (from the end of one invocation
to the start of the next) in 1-minute bins over a limited range (4 hours). Its branches, in order:

1. Too few idle times yet (a new or rare function): the standard keep-alive (a fixed time, no
   pre-warm), as the paper does while it learns.
2. Most idle times beyond the range: the paper forecasts the next idle time with ARIMA; here a
   forecast over the function's recent out-of-bounds idle times (their median by default; the
   last one and simple exponential smoothing are the variants ``loadtest.keepalive_sim``
   measures against it, and deciding from the first such idle time, ``forecast_min_samples``).
   The instance is unloaded after the invocation, pre-warmed at the forecast minus a margin and
   kept until the forecast plus the margin (the paper's 15%). On the one-day Azure sample it
   decides for next to no function: few have five idle times in a day, most of them over 4 hours.
3. A histogram without a prominent pattern (CV of the bin counts under 2, the paper's threshold):
   the standard keep-alive again.
4. A representative histogram: unloaded right after an invocation, pre-warmed at the head (5th
   percentile) of the idle times minus a 10% margin, kept loaded until the tail plus a margin (the
   paper's 99th percentile plus 10%; here the longest idle time within the range plus 5%, p99 and
   p95 competing with it on cost, see below). When the head is in the first bin the instance is
   not unloaded at all, and then the window is never shorter than the standard keep-alive:
   measured on the Azure day, a shorter one saves next to no memory on those (frequent)
   functions and costs them cold starts. The window
   (or one to a lower percentile) is taken only if, on the idle times seen so far, it would have
   cost less than the standard keep-alive, idle seconds plus ``cold_start_cost_s`` per cold start
   (the paper always takes it; on the Azure day that keeps 1.47x the idle time of a fixed 10 min;
   with this cost, 0.50x the cold starts of a fixed 10 min at 0.997x its idle time).

The ``fixed`` policy is the state of practice the paper compares against: keep every instance loaded
for a fixed time after each invocation.

Every time constant scales together (:meth:`HybridPolicy.scaled`), so a replay on a compressed clock
runs the same policy, and the simulator and the pool manager call the same :meth:`decide`.

Pure logic: no Kafka, no I/O, no clock. The pool manager feeds arrivals in and turns decisions into
prewarm and recycle commands (:meth:`KeepAliveDecision.wants_loaded` says which, at a given idle time).
"""

from __future__ import annotations

import math
import statistics
from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from itertools import accumulate
from typing import Protocol

__all__ = [
    "DEFAULT_BIN_S",
    "DEFAULT_RANGE_S",
    "FORECASTS",
    "FixedPolicy",
    "HybridPolicy",
    "IdleHistogram",
    "KeepAliveDecision",
    "KeepAlivePolicy",
    "forecast_idle_s",
    "policy_from_config",
]

DEFAULT_RANGE_S: float = 4 * 3600.0
"""Idle times the histogram bins (the paper's 4 hours); longer ones only count as out of bounds."""

DEFAULT_BIN_S: float = 60.0
"""Bin width: the paper's 1 minute, also the granularity of the Azure Functions trace."""

DEFAULT_RECENT: int = 8
"""Out-of-bounds idle times each histogram remembers for the forecast."""

FORECASTS: tuple[str, ...] = ("median", "last", "ses")
"""Forecasts of the next out-of-bounds idle time: the median of the recent ones, the latest one,
simple exponential smoothing (alpha 0.5)."""


def forecast_idle_s(recent: Sequence[float], kind: str = "median") -> float:
    """The next idle time forecast from ``recent`` ones (oldest first); ``recent`` must not be empty."""
    if not recent:
        raise ValueError("nothing to forecast from")
    if kind == "median":
        return float(statistics.median(recent))
    if kind == "last":
        return float(recent[-1])
    if kind == "ses":
        level = float(recent[0])
        for x in recent[1:]:
            level = 0.5 * x + 0.5 * level
        return level
    raise ValueError(f"unknown forecast {kind!r}: expected one of {', '.join(FORECASTS)}")


class IdleHistogram:
    """A range-limited histogram of one function's idle times.

    Bin ``i`` counts idle times in ``[i * bin_s, (i + 1) * bin_s)``; an idle time of ``range_s`` or
    more only increments :attr:`out_of_bounds`. Memory is constant (``range_s / bin_s`` counters),
    so the pool manager can hold one per function.
    """

    __slots__ = ("range_s", "bin_s", "bins", "count", "out_of_bounds", "recent_out_of_bounds", "_sum_sq", "_last_end_s")

    def __init__(
        self, range_s: float = DEFAULT_RANGE_S, bin_s: float = DEFAULT_BIN_S, recent: int = DEFAULT_RECENT
    ) -> None:
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
        self.recent_out_of_bounds: deque[float] = deque(maxlen=max(1, recent))
        """The latest out-of-bounds idle times (seconds, oldest first), for the forecast."""
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
            self.recent_out_of_bounds.append(idle_s)
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
    """The hybrid-histogram policy of Shahrad et al. (ATC 2020), with a forecast for out-of-bounds idle times."""

    range_s: float = DEFAULT_RANGE_S
    """Range of the histogram: idle times beyond it are out of bounds."""
    bin_s: float = DEFAULT_BIN_S
    """Histogram bin width."""
    head_pct: float = 5.0
    """Percentile of idle times that sets the pre-warm point."""
    tail_pct: float = 100.0
    """Percentile of idle times that sets the end of the keep-alive window. The paper's is 99; here
    the longest idle time seen within the range, with p99 and p95 competing on cost
    (``alternative_tail_pcts``): on the Azure day that keeps the same idle time for fewer cold
    starts (``loadtest.keepalive_sim`` measures the paper's 99 as a variant)."""
    margin: float = 0.10
    """Safety margin: the pre-warm point comes this share earlier (and the unload point this share
    later, unless ``tail_margin`` says otherwise)."""
    tail_margin: float | None = 0.05
    """Safety margin of the unload point; ``None``: ``margin``. Smaller than the head's: the tail is
    already the longest idle time seen, and every extra second of it is idle memory."""
    fallback_keep_alive_s: float = 600.0
    """The standard keep-alive, while the histogram is not representative (and the floor of a
    window that does not unload after use, see ``floor_no_prewarm``)."""
    min_samples: int = 5
    """Idle times needed before the histogram (or the forecast) is trusted; until then, the fallback."""
    min_cv: float = 2.0
    """CV of the bin counts below which idle times show no pattern (the paper's threshold, 2)."""
    max_out_of_bounds_share: float = 0.5
    """Share of out-of-bounds idle times from which the forecast decides instead of the histogram."""
    forecast: str | None = "median"
    """How out-of-bounds idle times are forecast (one of :data:`FORECASTS`); ``None``: the fallback."""
    forecast_min_samples: int | None = None
    """Out-of-bounds idle times from which the forecast decides even before ``min_samples`` idle
    times are known (``None``: only after, like the histogram)."""
    forecast_margin: float = 0.15
    """The forecast's window: from the forecast minus this share to the forecast plus it (the paper's 15%)."""
    floor_no_prewarm: bool = True
    """A histogram window that starts at 0 (head in the first bin) lasts at least the standard keep-alive."""
    cold_start_cost_s: float | None = 2550.0
    """Idle instance-seconds one cold start is worth. The histogram's window is taken only when,
    on the idle times seen so far, it costs less (idle time plus this per cold start) than the
    standard keep-alive would have; else the standard keep-alive. ``None``: always the window
    (the paper)."""
    alternative_head_pcts: tuple[float, ...] = (25.0,)
    """Higher head percentiles whose windows compete with the paper's (``head_pct``) on that cost."""
    alternative_tail_pcts: tuple[float, ...] = (95.0, 99.0)
    """Lower tail percentiles whose windows compete with the paper's (``tail_pct``) on that cost."""

    def __post_init__(self) -> None:
        if not 0 <= self.head_pct <= self.tail_pct <= 100:
            raise ValueError(f"need 0 <= head_pct <= tail_pct <= 100, got {self.head_pct}, {self.tail_pct}")
        margins = (self.margin, self.forecast_margin, self.margin if self.tail_margin is None else self.tail_margin)
        if not all(0 <= m < 1 for m in margins):
            raise ValueError(f"margins must be within [0, 1), got {margins}")
        if self.fallback_keep_alive_s < 0 or self.min_samples < 1:
            raise ValueError("fallback_keep_alive_s must be >= 0 and min_samples >= 1")
        if self.forecast is not None and self.forecast not in FORECASTS:
            raise ValueError(f"unknown forecast {self.forecast!r}: expected one of {', '.join(FORECASTS)} or None")
        IdleHistogram(self.range_s, self.bin_s)  # validates the shape once, here, not per function

    @property
    def name(self) -> str:
        """``hybrid``."""
        return "hybrid"

    def scaled(self, factor: float) -> HybridPolicy:
        """The same policy on a clock ``factor`` times faster: every time constant divided by it.

        A replay that compresses the trace's time by ``factor`` runs this, so its histogram bins,
        range and fallback keep-alive mean the same trace minutes as on the real clock.
        """
        if factor <= 0:
            raise ValueError(f"time scale must be > 0, got {factor}")
        return replace(
            self,
            range_s=self.range_s / factor,
            bin_s=self.bin_s / factor,
            fallback_keep_alive_s=self.fallback_keep_alive_s / factor,
        )

    def new_histogram(self) -> IdleHistogram:
        """An empty histogram with this policy's range and bin width."""
        return IdleHistogram(self.range_s, self.bin_s)

    def decide(self, hist: IdleHistogram) -> KeepAliveDecision:
        """The decision after an invocation ends, from the idle times ``hist`` holds (see the module's branches).

        ``keep_alive_s`` counts from the pre-warm point, so for the histogram it is the tail window
        minus the pre-warm window. Head and tail round towards keeping the instance loaded (the
        lower edge of the head bin, the upper edge of the tail bin): a cold start costs a
        user-visible delay, idle time only memory.
        """
        if hist.bin_s != self.bin_s or hist.range_s != self.range_s:
            raise ValueError("histogram shape differs from the policy's; make it with new_histogram()")
        total = hist.total
        early = self.forecast_min_samples is not None and hist.out_of_bounds >= self.forecast_min_samples
        if total < self.min_samples and not early:
            return self._fallback(f"too few idle times ({total} < {self.min_samples})")
        oob = hist.out_of_bounds_share
        if oob >= self.max_out_of_bounds_share:
            why = f"out of bounds ({oob:.0%} of idle times >= {self.range_s / 60:g} min)"
            if self.forecast is None or not hist.recent_out_of_bounds:
                return self._fallback(why)
            expected = forecast_idle_s(hist.recent_out_of_bounds, self.forecast)
            prewarm_s = expected * (1 - self.forecast_margin)
            return KeepAliveDecision(
                prewarm_s,
                expected * (1 + self.forecast_margin) - prewarm_s,
                f"forecast ({self.forecast} of {len(hist.recent_out_of_bounds)} idle times "
                f"beyond the range: {expected:.0f}s; {why})",
            )
        cv = hist.cv
        if cv < self.min_cv:
            return self._fallback(f"no pattern (CV {cv:.2f} < {self.min_cv:g})")
        head_bin, tail_bin = hist.percentile_bins(self.head_pct, self.tail_pct)
        head_s = head_bin * self.bin_s
        found = f"p{self.head_pct:g} {head_s:g}s, p{self.tail_pct:g} {(tail_bin + 1) * self.bin_s:g}s, CV {cv:.1f}"
        prewarm_s, unload_s = self._window(head_bin, tail_bin)
        if self.cold_start_cost_s is None:
            return KeepAliveDecision(prewarm_s, unload_s - prewarm_s, f"histogram ({found})")
        # The paper's window, windows ending at lower tail percentiles, and the standard
        # keep-alive: the one that would have cost least on the idle times seen so far.
        seen = [(i, c) for i, c in enumerate(hist.bins) if c]
        oob = hist.out_of_bounds
        paper = (self.head_pct, self.tail_pct)
        best: tuple[float, float] = (prewarm_s, unload_s)
        best_cost = self._cost(seen, oob, *best)
        best_pct: tuple[float, float] | None = paper
        standard = (0.0, self.fallback_keep_alive_s)
        cost = self._cost(seen, oob, *standard)
        if cost < best_cost:
            best, best_cost, best_pct = standard, cost, None
        heads = [self.head_pct, *(p for p in self.alternative_head_pcts if p > self.head_pct)]
        tails = [self.tail_pct, *(p for p in self.alternative_tail_pcts if p < self.tail_pct)]
        marks = hist.percentile_bins(*heads, *tails)
        for h_pct, h_bin in zip(heads, marks[: len(heads)], strict=True):
            for t_pct, t_bin in zip(tails, marks[len(heads) :], strict=True):
                if t_bin < h_bin or (h_pct, t_pct) == paper:
                    continue
                # The floor keeps the paper's own window from being shorter than the standard
                # keep-alive; the alternatives may be, when the cost says so.
                window = self._window(h_bin, t_bin, floor=False)
                cost = self._cost(seen, oob, *window)
                if cost < best_cost:
                    best, best_cost, best_pct = window, cost, (h_pct, t_pct)
        per = f"{best_cost / hist.total:.0f}s per idle time"
        if best_pct is None:
            return self._fallback(f"the standard keep-alive costs least ({found}; {per})")
        return KeepAliveDecision(
            best[0], best[1] - best[0], f"histogram ({found}; p{best_pct[0]:g}-p{best_pct[1]:g}: {per})"
        )

    def _window(self, head_bin: int, tail_bin: int, floor: bool = True) -> tuple[float, float]:
        """Pre-warm and unload points (seconds after an invocation ends) of a head and a tail bin."""
        prewarm_s = head_bin * self.bin_s * (1 - self.margin)
        tail_margin = self.margin if self.tail_margin is None else self.tail_margin
        unload_s = (tail_bin + 1) * self.bin_s * (1 + tail_margin)
        if prewarm_s <= 0 and self.floor_no_prewarm and floor:
            unload_s = max(unload_s, self.fallback_keep_alive_s)
        return prewarm_s, unload_s

    def _cost(self, seen: Sequence[tuple[int, int]], out_of_bounds: int, prewarm_s: float, unload_s: float) -> float:
        """Idle seconds plus ``cold_start_cost_s`` per cold start, had the window ``prewarm_s``-``unload_s``
        followed each idle time seen (``(bin, count)`` pairs; each idle time taken at the middle of
        its bin; out-of-bounds ones are cold and idle through the window)."""
        cold_s = self.cold_start_cost_s or 0.0
        bin_s = self.bin_s
        span = unload_s - prewarm_s
        total = out_of_bounds * (span + cold_s)
        for i, c in seen:
            idle = (i + 0.5) * bin_s
            if idle < prewarm_s:
                total += c * cold_s
            elif idle <= unload_s:
                total += c * (idle - prewarm_s)
            else:
                total += c * (span + cold_s)
        return total

    def _fallback(self, why: str) -> KeepAliveDecision:
        return KeepAliveDecision(0.0, self.fallback_keep_alive_s, f"fallback: {why}")


def policy_from_config(kind: str, fixed_s: float, time_scale: float = 1.0) -> FixedPolicy | HybridPolicy:
    """The policy a pool manager is configured with: ``fixed`` (keep-alive ``fixed_s``) or ``hybrid``.

    ``fixed_s`` only applies to ``fixed``; ``hybrid`` uses the paper's parameters with the
    standard keep-alive (10 minutes) as its fallback, every time constant divided by
    ``time_scale`` (a replay on a compressed clock).
    """
    normalized = kind.strip().lower()
    if normalized == "fixed":
        return FixedPolicy(fixed_s)
    if normalized == "hybrid":
        return HybridPolicy() if time_scale == 1.0 else HybridPolicy().scaled(time_scale)
    raise ValueError(f"unknown keep-alive policy {kind!r}: expected 'fixed' or 'hybrid'")
