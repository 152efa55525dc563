"""``python -m loadtest SCENARIO [options]``: the benchmark scenarios and the report.

Scenarios: floor, warm, cold, throughput, trace, hops; all (floor to trace in turn, then the report;
``--quick`` for small sizes); report; and the other programs spine, starts, prewarm, keepalive, throttle,
workflows, idle, cost.
``python -m loadtest SCENARIO --help`` lists a scenario's options.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

SCENARIOS: dict[str, tuple[str, str]] = {
    "floor": ("loadtest.floor", "bare Kafka round trip and the direct consumer (the floor)"),
    "warm": ("loadtest.warm", "warm invocations through Stoker (Kafka, HTTP) next to the direct consumer"),
    "cold": ("loadtest.cold", "first invocation per start kind, next to python -c"),
    "throughput": ("loadtest.throughput", "open-loop rates until latency or errors break, Stoker and direct"),
    "trace": ("loadtest.replay", "Azure Functions trace replay: cold starts and instance-seconds per policy"),
    "hops": ("loadtest.hops", "where a warm invocation's time goes, from the Kafka records' timestamps"),
    "report": ("loadtest.report", "markdown report of every scenario's latest results, with the targets"),
    "spine": ("loadtest.spine", "warm and first-invocation latency over Kafka (make bench)"),
    "starts": ("loadtest.starts", "Execute -> instance ready per start kind"),
    "prewarm": ("loadtest.prewarm", "webhook -> prewarmed-and-active time"),
    "keepalive": ("loadtest.keepalive_sim", "keep-alive policies simulated on the trace"),
    "throttle": ("loadtest.throttle", "noisy-neighbour throttling"),
    "workflows": ("loadtest.workflows", "workflow overhead and prewarm"),
    "idle": ("loadtest.idle", "CPU and broker connections of the idle platform, per component"),
    "cost": ("loadtest.cost", "CPU ms per invocation, per component, under load (Stoker and direct)"),
    "triggers": ("loadtest.triggers", "topic-trigger throughput next to a direct consumer of the same topic"),
}
ALL = ("floor", "warm", "cold", "throughput", "trace")
QUICK: dict[str, list[str]] = {
    "floor": ["--bare", "300", "--direct", "300", "--concurrent", "600"],
    "warm": ["--n", "300", "--concurrent", "600", "--http-n", "200"],
    "cold": ["--reps", "8"],
    "throughput": ["--rates", "50,100,200,400,800,1600", "--step-s", "3"],
    "trace": ["--minutes", "30", "--functions", "8"],
}


def entry(name: str) -> Callable[[list[str]], int]:
    module = importlib.import_module(SCENARIOS[name][0])
    main: Callable[[list[str]], int] = module.main
    return main


def usage() -> str:
    width = max(len(n) for n in SCENARIOS)
    lines = [__doc__.strip(), "", "scenarios:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in SCENARIOS.items()]
    lines.append(f"  {'all':<{width}}  {', '.join(ALL)} in turn, then report (--quick: small sizes)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name == "all":
        quick = "--quick" in rest
        rest = [a for a in rest if a != "--quick"]
        for scenario in ALL:
            code = entry(scenario)([*(QUICK[scenario] if quick else []), *rest])
            if code:
                return code
        out = [rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--out"]
        return entry("report")(["--results", out[-1]] if out else [])
    if name not in SCENARIOS:
        print(f"unknown scenario {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return entry(name)(rest)


if __name__ == "__main__":
    raise SystemExit(main())
