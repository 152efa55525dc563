"""Nodes, placement and throttling through the platform: roles and taints, node commands,
isolation by the throttler and by the user, and invocations with no eligible node."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from events import InvocationCompleted, now_ms
from services.common.client import StokerClient
from tests.e2e.conftest import Platform, processes_under, start_platform
from tests.helpers import assert_eventually

FNS = Path(__file__).resolve().parents[1] / "integration" / "fns"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    home = tmp_path_factory.mktemp("cluster")
    platform, _ = start_platform(
        home, "--no-example", env_extra={"STOKER_THROTTLE_COOLDOWN_S": "4", "STOKER_NODE_TIMEOUT_S": "3"}
    )
    try:
        yield platform
    finally:
        platform.stoker("down", check=False)
        assert not processes_under(home)


def invoke(
    platform: Platform, function: str, payload: Any = None, deadline_s: float | None = None, timeout_s: float = 60
) -> InvocationCompleted:
    async def go() -> InvocationCompleted:
        async with StokerClient(platform.settings) as client:
            deadline = now_ms() + int(deadline_s * 1000) if deadline_s else None
            return await client.invoke(function, payload, timeout_s=timeout_s, deadline_ms=deadline)

    return asyncio.run(go())


def decisions(platform: Platform) -> list[dict[str, Any]]:
    return platform.status()["throttle_decisions"]  # type: ignore[no-any-return]


def test_default_cluster_has_roles_and_taints(cluster: Platform) -> None:
    status = cluster.status()
    nodes = status["nodes"]
    assert {"management-0", "runtime-0", "runtime-1", "isolated-0"} <= set(nodes)
    assert nodes["management-0"]["labels"]["stoker.io/role"] == "management"
    assert nodes["runtime-0"]["taints"] == ["stoker.io/dedicated=runtime:NoSchedule"]
    assert nodes["isolated-0"]["taints"] == ["stoker.io/dedicated=isolated:NoSchedule"]
    assert nodes["management-0"]["instances"] == []
    assert all(s["node"] == "management-0" for n, s in status["services"].items() if not n.startswith("agent-"))
    cluster.stoker("fn", "create", "victim", "--code", str(FNS / "probe"), "--entrypoint", "handler:main")
    ran_on = {invoke(cluster, "victim", {"action": "echo"}).node for _ in range(4)}
    assert ran_on <= {"runtime-0", "runtime-1"}  # never on management or isolation nodes


def test_the_throttler_clamps_then_isolates_a_cpu_hog_and_releases_it(cluster: Platform) -> None:
    cluster.stoker("fn", "create", "hog", "--code", str(FNS / "hog"), "--entrypoint", "handler:main", "--timeout", "60")
    started = time.monotonic()

    async def hog_and_victim() -> tuple[list[InvocationCompleted], list[InvocationCompleted]]:
        async with StokerClient(cluster.settings) as client:
            # Long enough that, clamped late on a busy machine, it still presses on its quota for
            # the intervals that lead to isolation.
            hogs = [asyncio.create_task(client.invoke("hog", {"seconds": 10}, timeout_s=60))]
            victims = []
            for _ in range(12):
                victims.append(await client.invoke("victim", {"action": "echo"}, timeout_s=30))
                await asyncio.sleep(0.5)
            hogs.append(asyncio.create_task(client.invoke("hog", {"seconds": 1}, timeout_s=60)))
            return list(await asyncio.gather(*hogs)), victims

    hogs, victims = asyncio.run(hog_and_victim())
    assert all(v.status == "ok" for v in victims), [(v.status, v.error) for v in victims if v.status != "ok"]
    actions = [d for d in decisions(cluster) if d["function"] == "hog"]
    kinds = [d["action"] for d in actions]
    assert "clamp" in kinds and "isolate" in kinds, actions
    assert kinds.index("clamp") < kinds.index("isolate")
    assert "cpu" in actions[0]["rule"] and actions[0]["figures"]["cpu_millis"] > actions[0]["figures"]["cpu_bound"]
    assert time.monotonic() - started < 60
    status = cluster.status()
    assert "hog" in status["isolations"] or "release-isolation" in kinds, (status["isolations"], actions)
    # Once isolated, new instances of the hog run only on the isolation node.
    assert hogs[1].status == "ok" and hogs[1].node == "isolated-0", hogs[1]
    # Quiet for the cool-down: released, and it runs on runtime nodes again.
    assert_eventually(lambda: "hog" not in cluster.status()["isolations"], timeout_s=30, interval_s=1)
    assert any(d["action"] == "release-isolation" for d in decisions(cluster) if d["function"] == "hog")
    assert invoke(cluster, "hog", {"seconds": 0}).node in ("runtime-0", "runtime-1")


def test_user_isolation_and_no_eligible_node(cluster: Platform) -> None:
    cluster.stoker("fn", "isolate", "victim", "--for", "60")
    assert_eventually(lambda: invoke(cluster, "victim", {"action": "echo"}).node == "isolated-0", timeout_s=15)
    assert cluster.status()["isolations"]["victim"]["by"] == "user"
    cluster.stoker("fn", "isolate", "victim", "--release")
    assert_eventually(lambda: invoke(cluster, "victim", {"action": "echo"}).node != "isolated-0", timeout_s=15)

    cluster.stoker(
        "fn",
        "create",
        "on-mars",
        "--code",
        str(FNS / "probe"),
        "--entrypoint",
        "handler:main",
        "--node-selector",
        "zone=mars",
    )
    result = invoke(cluster, "on-mars", {"action": "echo"}, deadline_s=2)
    assert result.status == "rejected" and result.error is not None
    assert result.error.kind == "no_eligible_node" and "zone" in result.error.message


def test_node_commands_change_a_running_cluster(cluster: Platform) -> None:
    cluster.stoker("node", "cordon", "runtime-0")
    assert_eventually(lambda: cluster.status()["nodes"]["runtime-0"]["unschedulable"], timeout_s=10)
    cluster.stoker(
        "fn", "create", "spread", "--code", str(FNS / "probe"), "--entrypoint", "handler:main", "--reuse", "fresh"
    )
    assert {invoke(cluster, "spread", {"action": "echo"}).node for _ in range(3)} == {"runtime-1"}
    cluster.stoker("node", "uncordon", "runtime-0")

    # A NoExecute taint the functions do not tolerate: its instances leave, nothing new comes.
    cluster.stoker("node", "taint", "runtime-1", "maintenance=yes:NoExecute")
    assert_eventually(
        lambda: not any(i.get("function") for i in cluster.status()["nodes"]["runtime-1"]["instances"]),
        timeout_s=15,
        message="function instances left the NoExecute node",
    )
    assert {invoke(cluster, "victim", {"action": "echo"}).node for _ in range(3)} == {"runtime-0"}
    cluster.stoker("node", "taint", "runtime-1", "maintenance-")
    cluster.stoker("node", "label", "runtime-1", "zone=mars")
    assert_eventually(
        lambda: invoke(cluster, "on-mars", {"action": "echo"}, deadline_s=5).node == "runtime-1", timeout_s=20
    )

    cluster.stoker("node", "add", "runtime-9")
    assert_eventually(lambda: cluster.status()["nodes"].get("runtime-9", {}).get("up"), timeout_s=15)
    cluster.stoker("node", "drain", "runtime-9")
    status = assert_eventually(lambda: (s := cluster.status()) and s["nodes"]["runtime-9"]["unschedulable"] and s)
    assert orjson.dumps(status)  # the status stays renderable with a drained node
