"""PNG plots of the scenarios (matplotlib, optional: ``pip install -e '.[bench]'``).

Every function returns the path written, or ``None`` when matplotlib is not installed or there is
nothing to draw: a missing plot never fails a benchmark.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loadtest.stats import percentile


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _plain_log_ticks(axis: Any) -> None:
    """Log scale with plain numbers (5, 10, 20) instead of powers of ten."""
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(plain)


def latency_cdf(series: Mapping[str, Sequence[float]], path: Path, title: str) -> Path | None:
    """Cumulative distribution of latencies per series, log-scaled milliseconds, percentiles marked."""
    plt = _pyplot()
    ordered: dict[str, list[float]] = {k: sorted(v) for k, v in series.items() if v}
    if plt is None or not ordered:
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, values in ordered.items():
        n = len(values)
        ys = [(i + 1) / n * 100 for i in range(n)]
        line = ax.plot(
            values, ys, label=f"{label} (p50 {percentile(values, 50):.2f}, p99 {percentile(values, 99):.2f} ms)"
        )
        ax.axvline(percentile(values, 50), color=line[0].get_color(), linestyle=":", linewidth=0.8)
    for p in (50, 90, 99):
        ax.axhline(p, color="grey", linewidth=0.5)
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("latency, ms (log scale)")
    ax.set_ylabel("share of invocations at or below, %")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def boxes(series: Mapping[str, Sequence[float]], path: Path, title: str, ylabel: str = "ms") -> Path | None:
    """Box plot per series (log scale), e.g. the first invocation per start kind."""
    plt = _pyplot()
    series = {k: list(v) for k, v in series.items() if v}
    if plt is None or not series:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(series) + 2), 5))
    ax.boxplot(list(series.values()), whis=(1, 99), showfliers=True)
    ax.set_xticks(range(1, len(series) + 1), list(series.keys()), rotation=15, fontsize=8)
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_ylabel(f"{ylabel} (log scale)")
    ax.set_title(title)
    ax.grid(True, axis="y", which="both", alpha=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, title: str) -> Path | None:
    """Offered rate -> answered rate and p50/p99 latency, one line per system."""
    plt = _pyplot()
    runs = {k: v for k, v in runs.items() if v}
    if plt is None or not runs:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    top = 0.0
    for label, steps in runs.items():
        offered = [s["offered_per_s"] for s in steps]
        top = max(top, *offered)
        left.plot(offered, [s["achieved_per_s"] for s in steps], marker="o", label=label)
        p50 = [s["latency_ms"].get("p50") for s in steps]
        p99 = [s["latency_ms"].get("p99") for s in steps]
        line = right.plot(offered, p50, marker="o", label=f"{label} p50")
        right.plot(offered, p99, marker="x", linestyle="--", color=line[0].get_color(), label=f"{label} p99")
    left.plot([0, top], [0, top], color="grey", linewidth=0.6, linestyle=":", label="answered = offered")
    left.set_xlabel("offered, invocations/s")
    left.set_ylabel("answered in time, invocations/s")
    left.legend(fontsize=8)
    left.grid(True, alpha=0.25)
    right.set_xlabel("offered, invocations/s")
    right.set_ylabel("latency from due time, ms (log scale)")
    right.set_yscale("log")
    _plain_log_ticks(right.yaxis)
    right.tick_params(axis="y", which="minor", labelsize=7)
    right.legend(fontsize=8)
    right.grid(True, which="both", alpha=0.25)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def trace_timeline(runs: Mapping[str, Mapping[str, Sequence[float]]], path: Path, title: str) -> Path | None:
    """Per policy: invocations and cold starts per second, and specialized instances held, over time.

    Each run maps ``invocations``, ``cold``, ``held`` to per-second series.
    """
    plt = _pyplot()
    if plt is None or not runs:
        return None
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 3.2 * len(runs)), squeeze=False, sharex=True)
    for ax, (label, series) in zip(axes[:, 0], runs.items(), strict=True):
        xs = list(range(len(series.get("invocations", []))))
        ax.bar(xs, series.get("invocations", []), color="#9ecae1", label="invocations/s", width=1.0)
        ax.bar(xs, series.get("cold", []), color="#de2d26", label="cold starts/s", width=1.0)
        ax.set_ylabel("per second")
        ax.set_title(label, fontsize=10)
        twin = ax.twinx()
        held = series.get("held", [])
        twin.plot(range(len(held)), held, color="black", linewidth=1.2, label="instances held")
        twin.set_ylabel("specialized instances")
        twin.set_ylim(bottom=0, top=max([*held, 1.0]) * 1.15)
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        labels = ax.get_legend_handles_labels()[1] + twin.get_legend_handles_labels()[1]
        ax.legend(handles, labels, fontsize=8, loc="upper right")
    axes[-1, 0].set_xlabel("seconds from the start of the replay (compressed time)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def keepalive_pareto(points: Mapping[str, tuple[float, float]], path: Path, title: str) -> Path | None:
    """Keep-alive policies as points: cold-start share (%) against idle instance-seconds.

    ``points`` maps a label to ``(cold-start share %, idle instance-seconds)``. Labels starting with
    ``fixed`` are joined into one line (the fixed keep-alive frontier); every other point is marked
    and labelled, so a policy below and left of that line does better on both.
    """
    plt = _pyplot()
    if plt is None or not points:
        return None
    fig, ax = plt.subplots(figsize=(10, 6))
    fixed = sorted(((idle / 3600, cold, label) for label, (cold, idle) in points.items() if label.startswith("fixed")))
    if fixed:
        ax.plot([p[0] for p in fixed], [p[1] for p in fixed], marker="o", color="grey", label="fixed keep-alive")
        for x, y, label in fixed:
            ax.annotate(label.removeprefix("fixed "), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    markers = "s^vD<>pP*Xh"
    others = [(label, cold, idle) for label, (cold, idle) in points.items() if not label.startswith("fixed")]
    for n, (label, cold, idle) in enumerate(others):
        ax.scatter([idle / 3600], [cold], marker=markers[n % len(markers)], s=60, label=label, zorder=3)
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("idle instance-hours (log scale)")
    ax.set_ylabel("cold-start share of invocations, %")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
