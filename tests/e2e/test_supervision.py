"""Supervision in the embedded platform: a service that dies is started again, with a backoff, and
`stoker status` says so and why; several copies of the dispatcher, each under its own name."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.cli import platform as embedded
from services.common.runner import ready_file
from tests.e2e.conftest import Platform, processes_under, start_platform
from tests.helpers import assert_eventually


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    home = tmp_path_factory.mktemp("stoker-supervised")
    running, _ = start_platform(home, "--dispatchers", "2", "--nodes", "1", "--isolated", "0", "--no-example")
    try:
        yield running
    finally:
        supervisor = running.status()["supervisor"]["pid"]
        running.stoker("down", check=False)
        deadline = time.monotonic() + 10
        while processes_under(home) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not processes_under(home), f"processes left after `stoker down`: {processes_under(home)}"
        assert supervisor and not embedded.alive(supervisor), "the supervisor outlived `stoker down`"


def instance_name(pid: int) -> str | None:
    env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    return env.get("STOKER_INSTANCE_NAME")


def kill(platform: Platform, name: str) -> int:
    pid = platform.pids()[name]
    os.killpg(pid, signal.SIGKILL)
    return pid


def back_again(platform: Platform, name: str, old_pid: int, restarts: int) -> dict[str, Any]:
    """Wait until ``name`` runs as a new, ready process after ``restarts`` restarts; returns its status row."""

    def check() -> dict[str, Any]:
        row: dict[str, Any] = platform.status()["services"][name]
        assert row["pid"] not in (None, old_pid) and row["ready"] and row["restarts"] == restarts, row
        return row

    return assert_eventually(check, timeout_s=60, interval_s=0.2, message=f"{name} started again and ready")


def test_two_dispatchers_start_and_both_become_ready(cluster: Platform) -> None:
    services = cluster.status()["services"]
    copies = {name: row for name, row in services.items() if name.startswith("dispatcher")}
    assert sorted(copies) == ["dispatcher-0", "dispatcher-1"]
    assert all(row["ready"] for row in copies.values()), copies
    assert copies["dispatcher-0"]["pid"] != copies["dispatcher-1"]["pid"]
    for name, row in copies.items():
        assert instance_name(row["pid"]) == name  # the stable per-copy name each one is given
        assert ready_file(cluster.settings, name).exists()
    # one copy of everything else, under the plain names
    assert {"poolmgr", "workflow", "builder", "throttler", "gateway"} <= set(services)
    assert instance_name(services["poolmgr"]["pid"]) == "poolmgr"


def test_a_killed_service_comes_back_and_status_says_why(cluster: Platform) -> None:
    old = kill(cluster, "throttler")
    row = back_again(cluster, "throttler", old, restarts=1)
    assert row["state"] == "running" and row["uptime_s"] is not None
    last = row["last_exit"]
    assert last["signal"] == "SIGKILL" and last["reason"] == "killed by SIGKILL" and last["exit_code"] is None
    assert last["uptime_s"] > 0
    log = (cluster.home / "logs" / "platform.log").read_text()
    assert f"throttler (pid {old}) killed by SIGKILL" in log
    # the warning is followed by the end of the throttler's own log, indented
    tail = log.split(f"throttler (pid {old}) killed by SIGKILL")[1].splitlines()[1:4]
    own = (cluster.home / "logs" / "throttler.log").read_text()
    assert tail and all(line.startswith("    ") and line.strip() in own for line in tail), tail
    human = cluster.stoker("status").stdout
    assert re.search(r"throttler\s.*\b1\b.*SIGKILL", human), human


def test_a_killed_dispatcher_copy_comes_back_under_its_own_name(cluster: Platform) -> None:
    old = kill(cluster, "dispatcher-1")
    row = back_again(cluster, "dispatcher-1", old, restarts=1)
    assert instance_name(row["pid"]) == "dispatcher-1"
    assert cluster.status()["services"]["dispatcher-0"]["restarts"] == 0


def test_exits_in_a_row_wait_longer_each_time(cluster: Platform) -> None:
    delays = []
    for restarts in (1, 2, 3):
        # Killed as soon as it is back: each exit comes quickly after its start.
        pid = assert_eventually(
            lambda: cluster.status()["services"]["builder"]["pid"], timeout_s=30, message="builder running"
        )
        os.killpg(pid, signal.SIGKILL)

        def restarted(count: int = restarts, old: int = pid) -> dict[str, Any]:
            row: dict[str, Any] = cluster.status()["services"]["builder"]
            assert row["restarts"] == count and row["pid"] not in (None, old), row
            return row

        assert_eventually(restarted, timeout_s=30, interval_s=0.1, message=f"restart {restarts}")
        state = embedded.restart_record(cluster.settings, "builder") or {}
        delays.append(state["started_at"] - state["last_exit"]["at"])
    log = (cluster.home / "logs" / "platform.log").read_text()
    announced = [float(d) for d in re.findall(r"builder \(pid \d+\) killed by SIGKILL .*?again in ([\d.]+)s", log)]
    assert announced[-3:] == [0.5, 1.0, 2.0], announced
    for waited, planned in zip(delays, announced[-3:], strict=True):
        assert waited >= planned - 0.05, (delays, announced)
    back_again(cluster, "builder", -1, restarts=3)
