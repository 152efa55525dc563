"""What every side-by-side scenario shares: the platform it measures, the saved report, progress bars.

A scenario either starts a throwaway platform of its own (:func:`loadtest.platform.own_platform`:
free ports, a temporary state folder) or, with ``--bootstrap HOST:PORT`` or
``STOKER_BENCH_PLATFORM=running``, measures the platform already running there (its state folder
from ``$STOKER_HOME``, its gateway from ``--http`` or ``$STOKER_HTTP_PORT``). Baselines (the bare
Kafka hop, the direct consumer) always use the broker of the platform they are compared with.
"""

from __future__ import annotations

import argparse
import os
import platform as _platform
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from loadtest.platform import STOKER, own_platform
from loadtest.stats import machine_facts
from services.cli.broker import KAFKA_VERSION
from services.common.settings import CommonSettings

console = Console(width=None if sys.stdout.isatty() else 160)
"""Wide when the output is a file or a pipe, so tables do not wrap."""
RESULTS = Path(__file__).resolve().parent / "results"
"""Default results folder (``loadtest/results``, ignored by git)."""


@dataclass(frozen=True)
class Target:
    """The platform a scenario measures."""

    settings: CommonSettings
    http: str
    """Gateway base URL."""
    env: dict[str, str]
    """Environment for ``stoker`` commands against this platform."""
    own: bool
    """Started by this scenario (and stopped after it)."""
    platform_env: dict[str, str] = field(default_factory=dict)
    """The ``STOKER_*`` settings this scenario started its platform with (empty for a running one)."""

    @property
    def auth_headers(self) -> dict[str, str]:
        """The admin token ``stoker up`` left in the platform's state folder, as a request header."""
        path = self.settings.home / "admin-token"
        return {"Authorization": f"Bearer {path.read_text().strip()}"} if path.is_file() else {}

    def stoker(self, *args: str) -> str:
        """Run ``stoker ARGS`` against this platform; returns its output, raises on failure."""
        proc = subprocess.run([STOKER, *args], env=self.env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"stoker {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def describe(self) -> dict[str, Any]:
        return {
            "own_platform": self.own,
            "bootstrap": self.settings.bootstrap,
            "gateway": self.http,
            "topic_prefix": self.settings.topic_prefix,
            "platform_env": self.platform_env,
        }


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options every scenario takes: where results go, which platform, the seed."""
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default loadtest/results)")
    parser.add_argument(
        "--bootstrap",
        default=None,
        help="measure the platform running on this Kafka (HOST:PORT) instead of starting one "
        "(also: STOKER_BENCH_PLATFORM=running uses $STOKER_BOOTSTRAP)",
    )
    parser.add_argument(
        "--http", default=None, help="gateway URL of a running platform (default from $STOKER_HTTP_PORT)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of every random choice the scenario makes")
    parser.add_argument("--no-plot", action="store_true", help="do not write PNG plots")


def wants_running(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return bool(args.bootstrap) or env.get("STOKER_BENCH_PLATFORM", "") == "running"


@contextmanager
def target(args: argparse.Namespace, platform_env: dict[str, str] | None = None, *up_args: str) -> Iterator[Target]:
    """The platform to measure: a running one if asked for, else one started for this scenario."""
    if wants_running(args):
        env = dict(os.environ)
        if args.bootstrap:
            env["STOKER_BOOTSTRAP"] = args.bootstrap
        settings = CommonSettings.from_env(env)
        http = args.http or f"http://127.0.0.1:{env.get('STOKER_HTTP_PORT') or 8080}"
        yield Target(settings, http.rstrip("/"), env, own=False)
        return
    platform_env = dict(platform_env or {})
    # Plain prints, not a status spinner: a scenario may start platforms under its progress bars.
    console.print(f"starting a platform for the benchmark ({' '.join(up_args) or 'defaults'})")
    started = time.perf_counter()
    with own_platform(platform_env, *up_args) as (env, http):
        console.print(f"platform up in {time.perf_counter() - started:.1f}s at {env['STOKER_BOOTSTRAP']}")
        yield Target(CommonSettings.from_env(env), http, env, own=True, platform_env=platform_env)


def facts() -> dict[str, Any]:
    """Machine facts (``loadtest.stats.machine_facts``) plus what else moves the figures."""
    out = machine_facts(KAFKA_VERSION)
    try:
        out["cpu_model"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        out["cpu_model"] = _platform.processor()
    try:
        out["loadavg_at_start"] = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        pass
    for dist in ("aiokafka", "faststream", "httpx", "uvicorn", "orjson"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def new_report(scenario: str, args: argparse.Namespace, inputs: dict[str, Any]) -> dict[str, Any]:
    """The head every saved report has: scenario, when, machine facts, inputs and seed."""
    return {
        "scenario": scenario,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": facts(),
        "inputs": {**inputs, "seed": args.seed},
    }


def save(report: dict[str, Any], out: Path) -> Path:
    """Write ``<scenario>-<timestamp>.json`` into ``out``; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"{report['scenario']}-{stamp}.json"
    n = 1
    while path.exists():  # two runs within a second (the tests) keep both files
        n += 1
        path = out / f"{report['scenario']}-{stamp}-{n}.json"
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    console.print(f"saved {path}")
    return path


def plot_path(out: Path, scenario: str, what: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{scenario}-{what}-{time.strftime('%Y%m%d-%H%M%S')}.png"


def progress() -> Progress:
    """A Rich progress display for one scenario (transient: the table stays, the bars go)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: numbers rounded, missing values as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:,.{digits}f}"
    return str(value)
