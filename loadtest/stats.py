"""Percentiles and machine facts for benchmark reports."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from typing import Any


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (p in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def summary(values_ms: list[float]) -> dict[str, float]:
    s = sorted(values_ms)
    if not s:
        return {"n": 0}
    return {
        "n": len(s),
        "mean": round(statistics.fmean(s), 3),
        "p50": round(percentile(s, 50), 3),
        "p90": round(percentile(s, 90), 3),
        "p99": round(percentile(s, 99), 3),
        "max": round(s[-1], 3),
    }


def machine_facts(kafka_version: str) -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "kafka": kafka_version,
    }


def latency_summary(values_ms: list[float]) -> dict[str, float]:
    """``summary`` plus p99.9 and the minimum: what the side-by-side scenarios report."""
    s = sorted(values_ms)
    if not s:
        return {"n": 0}
    return {
        "n": len(s),
        "mean": round(statistics.fmean(s), 3),
        "min": round(s[0], 3),
        "p50": round(percentile(s, 50), 3),
        "p90": round(percentile(s, 90), 3),
        "p99": round(percentile(s, 99), 3),
        "p99.9": round(percentile(s, 99.9), 3),
        "max": round(s[-1], 3),
    }


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    """``a / b``, or ``None`` when either is missing or ``b`` is zero."""
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return round(a / b, digits)
