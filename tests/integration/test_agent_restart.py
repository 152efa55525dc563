"""An agent killed mid-work leaves cgroups behind; its successor finds and removes them."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from pathlib import Path

from events import FunctionSpec, InvocationRequested, Topics
from services.agent import cgroups
from services.common.admin import ensure_topics
from services.common.client import StokerClient, package_code
from services.common.settings import CommonSettings
from tests.helpers import RunningBroker, ServiceProcess, assert_eventually

FNS = Path(__file__).parent / "fns"


def test_restarted_agent_removes_leftover_cgroups_and_processes(kafka_broker: RunningBroker, tmp_path: Path) -> None:
    prefix = f"ar{uuid.uuid4().hex[:6]}."
    settings = CommonSettings(home=tmp_path / "home", bootstrap=kafka_broker.bootstrap, topic_prefix=prefix)
    asyncio.run(ensure_topics(settings.bootstrap, Topics(prefix).catalogue(invocation_partitions=1)))
    env = {"STOKER_NODE_NAME": "runtime-0", "STOKER_POOL_SIZE": "2", "STOKER_CGROUPS": "on"}
    dispatcher = ServiceProcess("services.dispatcher", "dispatcher", settings)
    agent = ServiceProcess("services.agent", "agent-runtime-0", settings, env)
    # The same driver the agent uses (one cgroup prefix per state folder).
    group_prefix = "stoker-" + hashlib.sha256(str(settings.home.resolve()).encode()).hexdigest()[:8]
    driver = cgroups.detect("runtime-0", prefix=group_prefix)
    try:
        dispatcher.wait_ready()
        agent.wait_ready()

        async def start_slow_work() -> None:
            async with StokerClient(settings) as client:
                source = package_code(settings, FNS / "probe")
                await client.put_function(FunctionSpec(name="slow", entrypoint="handler:main", source=source))
                await client.publish(InvocationRequested(function="slow", payload={"action": "sleep", "seconds": 30}))

        asyncio.run(start_slow_work())
        def running_groups() -> list[str]:
            # A group exists a moment before its process joins it: wait for processes inside.
            groups = [iid for iid in driver.list_instances() if driver.get(iid).pids()]
            return groups if len(groups) >= 2 else []

        before = assert_eventually(running_groups, message="instances running in the first agent's cgroups")
        pids = [p for iid in before for p in driver.get(iid).pids()]
        agent.kill()  # SIGKILL: no cleanup of its own

        successor = ServiceProcess("services.agent", "agent-runtime-0", settings, env)
        try:
            successor.wait_ready()
            assert_eventually(lambda: not set(before) & set(driver.list_instances()),
                              message="leftover cgroups removed")
            for pid in pids:
                assert_eventually(lambda pid=pid: not os.path.exists(f"/proc/{pid}"), message=f"process {pid} gone")
            assert "leftover instance cgroups" in successor.log()
        finally:
            successor.stop()
    finally:
        if agent.proc.poll() is None:
            agent.stop()
        dispatcher.stop()
    assert driver.list_instances() == [], "a stopped agent leaves no cgroup behind"
