"""The benchmark programs run end to end at tiny sizes against one shared platform, so they do not rot.

Figures at these sizes mean nothing; what is checked is that every scenario runs through the
platform's real paths, saves its inputs, machine facts and figures, and that the report reads them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from loadtest import cold, hops, idle, replay, report, throughput, warm
from tests.e2e.conftest import Platform, start_platform

REPO = Path(__file__).resolve().parents[2]
PLOTS = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def bench_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    running, _ = start_platform(tmp_path_factory.mktemp("stoker-bench-home"), "--no-example")
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key in ("STOKER_HOME", "STOKER_BOOTSTRAP", "STOKER_CONTROLLER_PORT", "STOKER_HTTP_PORT"):
                mp.setenv(key, running.env[key])
            mp.setenv("STOKER_BENCH_PLATFORM", "running")
            yield running
    finally:
        running.stoker("down", check=False)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-results")


def saved(results: Path, scenario: str) -> dict[str, Any]:
    [path] = sorted(results.glob(f"{scenario}-*.json"))
    data: dict[str, Any] = orjson.loads(path.read_bytes())
    assert data["scenario"] == scenario
    assert data["machine"]["cores"] and data["machine"]["kafka"] and data["machine"]["python"]
    assert data["inputs"]["seed"] == 1
    if PLOTS:
        assert data["plots"] and all((results / name).is_file() for name in data["plots"])
    return data


def test_floor_through_the_module_entry_point(bench_platform: Platform, results: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest",
            "floor",
            "--bare",
            "20",
            "--direct",
            "20",
            "--concurrent",
            "40",
            "--concurrency",
            "4",
            "--out",
            str(results),
        ],
        cwd=REPO,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "direct consumer" in proc.stdout
    data = saved(results, "floor")
    assert data["platform"]["bootstrap"] == bench_platform.env["STOKER_BOOTSTRAP"]
    assert data["bare_kafka_round_trip_ms"]["n"] == 20
    assert data["direct"]["sequential"]["ok"] == 20 and data["direct"]["concurrent"]["ok"] == 40


def test_warm_next_to_the_direct_consumer(bench_platform: Platform, results: Path) -> None:
    assert (
        warm.main(["--n", "20", "--concurrent", "40", "--concurrency", "4", "--http-n", "10", "--out", str(results)])
        == 0
    )
    data = saved(results, "warm")
    assert data["stoker"]["kafka"]["sequential"]["ok"] == 20
    assert data["stoker"]["http"]["sequential"]["ok"] == 10
    assert data["stoker"]["kafka"]["sequential"]["start_kinds"] == {"warm": 20}
    assert data["comparison"]["kafka_sequential"]["p50_ratio"] > 0


def test_cold_per_start_kind(bench_platform: Platform, results: Path) -> None:
    assert cold.main(["--reps", "2", "--out", str(results)]) == 0
    data = saved(results, "cold")
    light = data["figures"]["light"]
    assert set(light) == {"warm", "prewarmed", "pool", "python -c"}  # a running platform: no zygote/spawn
    assert light["warm"]["end_to_end_ms"]["n"] == 2 and light["python -c"]["end_to_end_ms"]["n"] == 2
    assert light["prewarmed"]["end_to_end_ms"]["n"] + sum(light["prewarmed"]["got_another_kind"].values()) == 2


def test_throughput_ramp(bench_platform: Platform, results: Path) -> None:
    assert throughput.main(["--rates", "20,40", "--step-s", "1", "--out", str(results)]) == 0
    data = saved(results, "throughput")
    assert set(data["steps"]) == {"direct consumer", "Stoker"}
    assert all(step["requests"] > 0 for steps in data["steps"].values() for step in steps)
    assert set(data["sustained_per_s"]) == {"direct consumer", "Stoker"}


def test_trace_replay_with_both_policies(bench_platform: Platform, results: Path) -> None:
    assert replay.main(["--minutes", "4", "--functions", "3", "--compress", "60", "--out", str(results)]) == 0
    data = saved(results, "trace")
    fixed, hybrid = data["runs"]["fixed"], data["runs"]["hybrid"]
    assert fixed["idle_s"] == 10.0 and hybrid["idle_s"] is None  # 10 minutes / 60 on a running platform
    for run in (fixed, hybrid):
        assert run["requests"] == data["inputs"]["invocations"] == run["ok"]
        assert run["cold_starts"] >= 1  # every function's first invocation is cold
        assert run["instance_seconds_held"] > 0 and run["heartbeats"] > 0
    assert "hybrid_vs_fixed" in data


def test_hops_from_record_timestamps(bench_platform: Platform, results: Path) -> None:
    assert hops.main(["--n", "10", "--concurrent", "20", "--concurrency", "4", "--out", str(results)]) == 0
    [path] = sorted(results.glob("hops-*.json"))
    runs = orjson.loads(path.read_bytes())["runs"]
    stoker = runs["Stoker, sequential x1"]
    assert stoker["matched"] == 10
    assert stoker["stages_ms"]["invocation -> Execute written (dispatcher)"]["n"] == 10
    assert runs["direct consumer, concurrent x4"]["stages_ms"]["invocation -> result written"]["n"] == 20


def test_idle_cost_of_every_platform_process(bench_platform: Platform, results: Path) -> None:
    assert idle.main(["--seconds", "3", "--settle", "0", "--out", str(results)]) == 0
    [path] = sorted(results.glob("idle-*.json"))
    data = orjson.loads(path.read_bytes())
    assert data["scenario"] == "idle" and data["inputs"]["seconds"] == 3 and data["machine"]["cores"]
    per = data["per_component"]
    assert {"broker", "dispatcher", "gateway", "poolmgr"} <= set(per)
    assert any(name.startswith("agent-runtime-") for name in per)
    assert data["cpu_pct_of_one_core"]["total"] == pytest.approx(sum(c["pct"] for c in per.values()))
    assert data["broker_connections"] > 0 and data["broker_connections_per_component"]["gateway"] > 0
    assert data["target_pct"] == 10.0 and isinstance(data["meets_target"], bool)


def test_report_reads_every_scenario(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "REPORT.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    for section in (
        "## Targets",
        "## Floor",
        "## Warm",
        "## First invocation",
        "## Throughput",
        "## Trace replay",
        "## Where the time goes",
    ):
        assert section in text
    assert "not measured" not in text
