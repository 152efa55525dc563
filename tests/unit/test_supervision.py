"""The embedded platform's restart policy, exit reasons and copies of a service (no processes)."""

from __future__ import annotations

import signal
from pathlib import Path

from services.cli.platform import PlatformConfig, RestartPolicy, copy_names, exit_reason
from services.common.settings import CommonSettings


def test_the_delay_doubles_with_quick_exits_up_to_the_cap() -> None:
    policy = RestartPolicy(first_delay_s=0.5, max_delay_s=30.0, stable_s=30.0)
    assert [policy.delay(n) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert policy.delay(10_000) == 30.0  # no overflow however long it crashes


def test_a_process_that_stayed_up_starts_the_doubling_afresh() -> None:
    policy = RestartPolicy(stable_s=30.0)
    streak = 0
    for uptime in (1.0, 2.0, 0.5):
        streak = policy.quick_exits(streak, uptime)
    assert streak == 3
    assert policy.quick_exits(streak, 29.9) == 4
    assert policy.quick_exits(streak, 30.0) == 1
    assert policy.delay(policy.quick_exits(streak, 600.0)) == policy.first_delay_s


def test_exit_reasons() -> None:
    assert exit_reason(-signal.SIGKILL) == ("killed by SIGKILL", None, "SIGKILL")
    assert exit_reason(-signal.SIGSEGV) == ("killed by SIGSEGV", None, "SIGSEGV")
    assert exit_reason(1) == ("exited with code 1", 1, None)
    assert exit_reason(0) == ("exited with code 0", 0, None)
    assert exit_reason(-200)[0] == "killed by signal 200"


def test_copies_are_named_after_the_service() -> None:
    assert copy_names("dispatcher", 1) == ["dispatcher"]
    assert copy_names("dispatcher", 3) == ["dispatcher-0", "dispatcher-1", "dispatcher-2"]
    config = PlatformConfig(common=CommonSettings(home=Path("/tmp/x")), dispatchers=2, poolmgrs=2, workflow_engines=3)
    modules: dict[str, list[str]] = {}
    for comp in config.components():
        modules.setdefault(comp.module, []).append(comp.name)
    assert modules["services.dispatcher"] == ["dispatcher-0", "dispatcher-1"]
    assert modules["services.poolmgr"] == ["poolmgr-0", "poolmgr-1"]
    assert modules["services.workflow"] == ["workflow-0", "workflow-1", "workflow-2"]
    assert modules["services.builder"] == ["builder"] and modules["services.gateway"] == ["gateway"]
    assert len({c.name for c in config.components()}) == len(config.components())
