"""The report: every scenario's latest results side by side, with the targets and by how much each is met.

    python -m loadtest report [--results loadtest/results] [--out loadtest/results/REPORT.md]

Reads the newest ``<scenario>-*.json`` of each scenario in the results folder (floor, warm, cold,
throughput, trace; and spine, starts, prewarm, keepalive when present) and writes one markdown
file. Targets are reported, never asserted: a missed target is a finding, with the figures next to it.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.table import Table

from loadtest.harness import RESULTS, console, fmt

SCENARIOS = ("floor", "warm", "cold", "throughput", "trace")
EXTRAS = ("hops",)
OTHERS = ("spine", "starts", "prewarm", "keepalive")


@dataclass(frozen=True)
class Verdict:
    """One target against the latest figures."""

    target: str
    measured: str
    limit: str
    met: bool | None
    """``None``: the scenario has not been run (or lacks the figure)."""
    margin: str
    source: str

    @property
    def status(self) -> str:
        return {True: "met", False: "MISSED", None: "not measured"}[self.met]


def latest(results: Path, scenario: str) -> tuple[Path, dict[str, Any]] | None:
    """The newest saved report of ``scenario`` (by modification time), or None."""
    files = sorted(results.glob(f"{scenario}-*.json"), key=lambda p: (p.stat().st_mtime, p.name))
    for path in reversed(files):
        try:
            data = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError:
            continue
        if isinstance(data, dict) and data.get("scenario", scenario).startswith(scenario.split("_")[0]):
            return path, data
    return None


def _get(data: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def at_most(target: str, measured: float | None, limit: float, unit: str, source: str) -> Verdict:
    """``measured <= limit``: the margin is the share of the limit left over, or by which it is exceeded."""
    if measured is None:
        return Verdict(target, "-", f"<= {limit:g}{unit}", None, "-", source)
    met = measured <= limit
    if unit.strip() == "ms":  # an absolute budget: say how many ms are left or over
        margin = f"{limit - measured:.2f} ms to spare" if met else f"missed by {measured - limit:.2f} ms"
    else:
        share = abs(measured / limit - 1) * 100 if limit else float("inf")
        margin = (
            f"{share:.0f}% under the limit" if met else f"missed by {share:.0f}% ({measured / limit:.2f}x the limit)"
        )
    return Verdict(target, f"{measured:.2f}{unit}", f"<= {limit:g}{unit}", met, margin, source)


def at_least(target: str, measured: float | None, limit: float, unit: str, source: str) -> Verdict:
    if measured is None:
        return Verdict(target, "-", f">= {limit:g}{unit}", None, "-", source)
    met = measured >= limit
    share = abs(measured / limit - 1) * 100 if limit else float("inf")
    margin = (
        f"{share:.0f}% above the limit" if met else f"missed by {share:.0f}% (a {limit / max(measured, 1e-9):.1f}x gap)"
    )
    return Verdict(target, f"{measured:.2f}{unit}", f">= {limit:g}{unit}", met, margin, source)


def verdicts(found: dict[str, tuple[Path, dict[str, Any]]]) -> list[Verdict]:
    """The targets of issue 6 against the latest figures."""
    warm = found.get("warm", (None, None))[1]
    tput = found.get("throughput", (None, None))[1]
    cold = found.get("cold", (None, None))[1]
    trace = found.get("trace", (None, None))[1]
    src = {k: v[0].name for k, v in found.items()}
    out = [
        at_most(
            "warm p50 <= 2x the direct consumer's p50 (Kafka, sequential)",
            _get(warm, "comparison", "kafka_sequential", "p50_ratio"),
            2.0,
            "x",
            src.get("warm", "-"),
        ),
        at_most(
            "warm p99 <= 3x the direct consumer's p99 (Kafka, sequential)",
            _get(warm, "comparison", "kafka_sequential", "p99_ratio"),
            3.0,
            "x",
            src.get("warm", "-"),
        ),
        at_least(
            "sustained throughput >= 0.5x the direct consumer's",
            _get(tput, "stoker_over_direct"),
            0.5,
            "x",
            src.get("throughput", "-"),
        ),
    ]
    pairs = _get(cold, "comparison", "light", "paired_difference_p50_ms")
    if pairs is None:
        pairs = _get(cold, "comparison", "light", "prewarmed_minus_warm_p50_ms")
    verdict = at_most(
        "prewarmed and warm end-to-end p50 within 1 ms",
        abs(pairs) if pairs is not None else None,
        1.0,
        " ms",
        src.get("cold", "-"),
    )
    if pairs is not None:
        faster = "prewarmed faster" if pairs < 0 else "prewarmed slower"
        verdict = Verdict(
            verdict.target,
            f"{pairs:+.2f} ms ({faster}, paired median)",
            verdict.limit,
            verdict.met,
            verdict.margin,
            verdict.source,
        )
    out.append(verdict)
    fixed, hybrid = _get(trace, "runs", "fixed"), _get(trace, "runs", "hybrid")
    if fixed and hybrid:
        fewer = hybrid["cold_starts"] < fixed["cold_starts"]
        cheaper = hybrid["instance_seconds_held"] <= fixed["instance_seconds_held"]
        cold_ratio = hybrid["cold_starts"] / fixed["cold_starts"] if fixed["cold_starts"] else float("nan")
        held_ratio = (
            hybrid["instance_seconds_held"] / fixed["instance_seconds_held"]
            if fixed["instance_seconds_held"]
            else float("nan")
        )
        out.append(
            Verdict(
                "trace replay: fewer cold starts than a fixed 10-minute keep-alive at no more instance-seconds",
                f"cold {hybrid['cold_starts']} vs {fixed['cold_starts']}; "
                f"instance-s {hybrid['instance_seconds_held']:.0f} vs {fixed['instance_seconds_held']:.0f}",
                "cold < fixed and instance-s <= fixed",
                fewer and cheaper,
                f"cold starts {cold_ratio:.2f}x ({'fewer' if fewer else 'not fewer'}), "
                f"instance-seconds {held_ratio:.2f}x ({'no more' if cheaper else 'more'})",
                src.get("trace", "-"),
            )
        )
    else:
        out.append(
            Verdict(
                "trace replay: fewer cold starts than a fixed 10-minute keep-alive at no more instance-seconds",
                "-",
                "cold < fixed and instance-s <= fixed",
                None,
                "-",
                src.get("trace", "-"),
            )
        )
    return out


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return lines + [""]


def _lat_row(label: str, s: dict[str, Any], per_s: Any = None) -> list[Any]:
    return [
        label,
        s.get("n"),
        s.get("p50"),
        s.get("p90"),
        s.get("p99"),
        s.get("p99.9"),
        s.get("max"),
        fmt(per_s, 0) if per_s is not None else "-",
    ]


LAT_HEADER = ["measure", "n", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "per s"]


def _head(name: str, path: Path, data: dict[str, Any]) -> list[str]:
    m = data.get("machine", {})
    machine = (
        f"{m.get('cores')} cores ({m.get('cpu_model', '?')}), Python {m.get('python')}, Kafka {m.get('kafka')}, "
        f"load average at start {m.get('loadavg_at_start', '-')}"
    )
    inputs = ", ".join(f"{k}={v}" for k, v in data.get("inputs", {}).items() if k not in ("code", "trace_functions"))
    return [
        f"## {name}",
        "",
        f"`{path.name}`, {data.get('when', '?')}. Machine: {machine}.",
        "",
        f"Inputs: {inputs}.",
        "",
    ]


def _plots(data: dict[str, Any], results: Path, out: Path) -> list[str]:
    lines = []
    for name in data.get("plots", []) or []:
        png = results / name
        if png.exists():
            lines += [f"![{name}]({os.path.relpath(png, out.parent)})", ""]
    return lines


def render(found: dict[str, tuple[Path, dict[str, Any]]], results: Path, out: Path) -> str:
    """The markdown report."""
    lines = [
        "# Stoker benchmarks",
        "",
        "Each scenario's latest run from `"
        + str(results)
        + "`, next to the baselines measured in the same session on the same broker. Produced by "
        "`python -m loadtest report`; how to run each scenario: `loadtest/README.md`.",
        "",
        "## Targets",
        "",
    ]
    rows = [[v.target, v.measured, v.limit, v.status, v.margin, f"`{v.source}`"] for v in verdicts(found)]
    lines += _md_table(["target", "measured", "limit", "status", "margin", "from"], rows)
    if "floor" in found:
        path, d = found["floor"]
        lines += _head("Floor: Kafka and the direct consumer", path, d)
        rows = [_lat_row("bare Kafka produce->consume (1 hop)", d.get("bare_kafka_round_trip_ms", {}))]
        for mode, f in d.get("direct", {}).items():
            rows.append(
                _lat_row(
                    f"direct consumer, {mode} x{f.get('concurrency')} (2 hops)",
                    f.get("latency_ms", {}),
                    f.get("throughput_per_s"),
                )
            )
        lines += _md_table(LAT_HEADER, rows) + _plots(d, results, out)
    if "warm" in found:
        path, d = found["warm"]
        lines += _head("Warm invocations (no-op function)", path, d)
        rows = []
        for mode in ("sequential", "concurrent"):
            for label, f in (
                ("direct consumer", _get(d, "direct", mode)),
                ("Stoker over Kafka", _get(d, "stoker", "kafka", mode)),
                ("Stoker over HTTP", _get(d, "stoker", "http", mode)),
            ):
                if f:
                    rows.append(
                        _lat_row(
                            f"{label}, {mode} x{f.get('concurrency')}",
                            f.get("latency_ms", {}),
                            f.get("throughput_per_s"),
                        )
                    )
        lines += _md_table(LAT_HEADER, rows)
        rows = [
            [k, c.get("p50_ratio"), c.get("p99_ratio"), c.get("p50_added_ms")]
            for k, c in d.get("comparison", {}).items()
        ]
        lines += ["Stoker over the direct consumer:", ""]
        lines += _md_table(["path and mode", "p50 ratio", "p99 ratio", "p50 added ms"], rows)
        split = _get(d, "stoker", "kafka", "sequential", "platform_split_ms") or {}
        if split:
            lines += [
                "Stoker's own split of a sequential warm invocation (p50, ms): "
                + ", ".join(f"{k} {v.get('p50')}" for k, v in split.items())
                + ". `queue` runs from the request's timestamp to an instance chosen on a node "
                "(client -> dispatcher -> agent: two hops), `total` to the result written.",
                "",
            ]
        lines += _plots(d, results, out)
    if "cold" in found:
        path, d = found["cold"]
        lines += _head("First invocation per start kind", path, d)
        rows = []
        for variant, by_kind in d.get("figures", {}).items():
            for kind, f in by_kind.items():
                s = f.get("end_to_end_ms", {})
                rows.append(
                    [
                        variant,
                        kind,
                        s.get("n"),
                        s.get("p50"),
                        s.get("p90"),
                        s.get("max"),
                        _get(f, "start_phase_ms", "p50"),
                        str(f.get("got_another_kind") or "") or "-",
                    ]
                )
        lines += _md_table(
            ["code", "start kind", "n", "end-to-end p50 ms", "p90 ms", "max ms", "start phase p50 ms", "other kinds"],
            rows,
        )
        for variant, c in d.get("comparison", {}).items():
            lines += [
                f"{variant}: prewarmed p50 - warm p50 = {fmt(c.get('prewarmed_minus_warm_p50_ms'))} ms; median of "
                f"{c.get('pairs', 0)} paired differences (a prewarmed call minus the warm call of the same function "
                f"right after it) = {fmt(c.get('paired_difference_p50_ms'))} ms.",
                "",
            ]
        lines += _plots(d, results, out)
    if "throughput" in found:
        path, d = found["throughput"]
        lines += _head("Throughput (open loop)", path, d)
        rows = []
        for label, steps in d.get("steps", {}).items():
            for s in steps:
                rows.append(
                    [
                        label,
                        fmt(s["offered_per_s"], 0),
                        fmt(s["achieved_per_s"], 0),
                        _get(s, "latency_ms", "p50"),
                        _get(s, "latency_ms", "p99"),
                        s.get("errors"),
                        _get(s, "send_lag_ms", "p99"),
                        ("repeated, " if s.get("repeated") else "")
                        + (f"broken: {s['why']}" if s.get("broken") else "held"),
                    ]
                )
        lines += _md_table(
            ["system", "offered /s", "answered /s", "p50 ms", "p99 ms", "errors", "send lag p99 ms", "verdict"], rows
        )
        held = d.get("held_every_rate", {})
        sustained = ", ".join(
            f"{k} {'>= ' if held.get(k) else ''}{fmt(v, 0)}/s" for k, v in d.get("sustained_per_s", {}).items()
        )
        lines += [f"Sustained: {sustained}; Stoker / direct = {fmt(d.get('stoker_over_direct'))}.", ""]
        if held.get("direct consumer"):
            lines += [
                "The direct consumer held every rate offered: its sustained figure is a lower bound (raise "
                "`--rates`), and so Stoker / direct is an upper bound.",
                "",
            ]
        lines += _plots(d, results, out)
    if "trace" in found:
        path, d = found["trace"]
        lines += _head("Trace replay (Azure Functions 2019 sample)", path, d)
        rows = []
        for policy, r in d.get("runs", {}).items():
            rows.append(
                [
                    policy,
                    r.get("requests"),
                    r.get("ok"),
                    r.get("cold_starts"),
                    r.get("cold_start_share_pct"),
                    _get(r, "latency_ms", "p50"),
                    _get(r, "latency_ms", "p99"),
                    _get(r, "latency_minus_exec_ms", "p50"),
                    fmt(r.get("instance_seconds_held"), 1),
                    fmt(r.get("instance_seconds_held_trace_time"), 0),
                    str(r.get("start_kinds", {})),
                ]
            )
        lines += _md_table(
            [
                "policy",
                "invocations",
                "ok",
                "cold starts",
                "cold share %",
                "p50 ms",
                "p99 ms",
                "p50 - exec ms",
                "instance-s held",
                "in trace time",
                "start kinds",
            ],
            rows,
        )
        for note in d.get("notes", []):
            lines += [f"Note: {note}", ""]
        lines += _plots(d, results, out)
    if "hops" in found:
        path, d = found["hops"]
        lines += _head("Where the time goes (Kafka record timestamps)", path, d)
        lines += [
            "Each stage from the `CreateTime` of the records involved (1 ms resolution): the invocation the "
            "client wrote, the `work.execute` command the dispatcher wrote, the result the agent (or the direct "
            "consumer) wrote, and when the client had the result.",
            "",
        ]
        rows = []
        for label, run in d.get("runs", {}).items():
            for stage, st in run.get("stages_ms", {}).items():
                rows.append([label, stage, st.get("p50"), st.get("p90"), st.get("p99")])
                label = ""
        lines += _md_table(["run", "stage", "p50 ms", "p90 ms", "p99 ms"], rows)
    older = [name for name in OTHERS if name in found]
    if older:
        lines += ["## Other benchmark programs (latest runs)", ""]
        for name in older:
            path, d = found[name]
            lines += [f"- `{path.name}` ({d.get('when', '?')}): " + _other_summary(name, d)]
        lines.append("")
    missing = [s for s in SCENARIOS if s not in found]
    if missing:
        lines += [
            "Not run yet: " + ", ".join(f"`python -m loadtest {s}`" for s in missing) + ".",
            "",
        ]
    return "\n".join(lines)


def _other_summary(name: str, d: dict[str, Any]) -> str:
    if name == "spine":
        return (
            f"bare Kafka p50 {_get(d, 'bare_kafka_round_trip_ms', 'p50')} ms, warm over Kafka p50 "
            f"{_get(d, 'warm_invocation_ms', 'p50')} ms, "
            f"first invocation p50 {_get(d, 'first_invocation_ms', 'p50')} ms."
        )
    if name == "starts":
        light = _get(d, "start_ms", "light") or {}
        return "start phase p50 (light code): " + ", ".join(f"{k} {v.get('p50')} ms" for k, v in light.items()) + "."
    if name == "prewarm":
        f = _get(d, "figures", "nodeps") or {}
        return (
            f"webhook -> prewarmed and active p50 {_get(f, 'webhook_to_ready_ms', 'p50')} ms, first call after a "
            f"commit p50 {_get(f, 'first_call_ms', 'p50')} ms, warm call p50 {_get(d, 'warm_call_ms', 'p50')} ms."
        )
    if name == "keepalive":
        return "simulated keep-alive, hybrid over fixed: " + ", ".join(
            f"{k} {v}x" for k, v in (d.get("hybrid_over_fixed") or {}).items()
        )
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the saved JSON results")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default RESULTS/REPORT.md)")
    args = parser.parse_args(argv)
    out = args.out or args.results / "REPORT.md"
    found = {name: hit for name in (*SCENARIOS, *EXTRAS, *OTHERS) if (hit := latest(args.results, name))}
    text = render(found, args.results.resolve(), out.resolve())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    table = Table("target", "measured", "limit", "status", "margin", title="Targets (latest results)")
    for v in verdicts(found):
        style = {True: "green", False: "red", None: "dim"}[v.met]
        table.add_row(v.target, v.measured, v.limit, f"[{style}]{v.status}[/{style}]", v.margin)
    console.print(table)
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
