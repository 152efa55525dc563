"""Instances on a real node agent: reuse types, zygote starts, sandbox limits, hostile functions."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from events import FunctionSpec, InvocationCompleted, Topics
from services.common.admin import ensure_topics
from services.common.client import StokerClient, package_code
from services.common.settings import CommonSettings
from tests.helpers import RunningBroker, ServiceProcess

FNS = Path(__file__).parent / "fns"


@pytest.fixture(scope="module")
def node(kafka_broker: RunningBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CommonSettings]:
    prefix = f"in{uuid.uuid4().hex[:6]}."
    settings = CommonSettings(home=tmp_path_factory.mktemp("home"), bootstrap=kafka_broker.bootstrap,
                              topic_prefix=prefix)
    asyncio.run(ensure_topics(settings.bootstrap, Topics(prefix).catalogue(invocation_partitions=1)))
    dispatcher = ServiceProcess("services.dispatcher", "dispatcher", settings)
    agent = ServiceProcess("services.agent", "agent-runtime-0", settings,
                           {"STOKER_NODE_NAME": "runtime-0", "STOKER_POOL_SIZE": "1", "STOKER_MAX_INSTANCES": "4",
                            "STOKER_CGROUPS": "on"})
    try:
        dispatcher.wait_ready()
        agent.wait_ready()

        async def deploy() -> None:
            async with StokerClient(settings) as client:
                stateful = package_code(settings, FNS / "stateful")
                hostile = package_code(settings, FNS / "hostile")
                for reuse in ("keep", "reset", "fresh"):
                    await client.put_function(FunctionSpec(name=f"state-{reuse}", entrypoint="handler:main",
                                                           source=stateful, reuse=reuse))  # type: ignore[arg-type]
                await client.put_function(FunctionSpec(name="hostile", entrypoint="handler:main", source=hostile,
                                                       timeout_s=3, memory_mb=64, pids_limit=16,
                                                       max_output_bytes=64 * 1024))

        asyncio.run(deploy())
        yield settings
    finally:
        agent.stop()
        dispatcher.stop()
        print(agent.log()[-3000:])


def invoke_all(settings: CommonSettings, function: str, payloads: list[Any]) -> list[InvocationCompleted]:
    async def go() -> list[InvocationCompleted]:
        async with StokerClient(settings) as client:
            return [await client.invoke(function, p, timeout_s=30) for p in payloads]

    return asyncio.run(go())


def test_keep_keeps_every_change_in_the_same_process(node: CommonSettings) -> None:
    first, second, third = (r.output for r in invoke_all(node, "state-keep", [None, None, None]))
    assert first["pid"] == second["pid"] == third["pid"]
    assert (first["calls"], second["calls"], third["calls"]) == (1, 2, 3)
    assert first["env"] is None and second["env"] == "dirty"
    assert not first["path_marker"] and second["path_marker"]
    assert first["cwd_is_base"] and not second["cwd_is_base"]
    assert first["tmp_files"] == [] and len(second["tmp_files"]) == 1


def test_reset_undoes_the_function_and_reuses_the_process(node: CommonSettings) -> None:
    results = invoke_all(node, "state-reset", [None, None, None])
    outputs = [r.output for r in results]
    assert len({o["pid"] for o in outputs}) == 1, outputs  # the same process, reused
    for found in outputs:
        # Every call finds the instance as a generic one: module state, env, sys.path, cwd, temp files.
        assert found["calls"] == 1 and found["env"] is None and not found["path_marker"]
        assert found["cwd_is_base"] and found["tmp_files"] == []
    assert [r.start for r in results[1:]] == ["pool", "pool"]  # back in the generic pool each time


def test_fresh_gives_every_invocation_a_new_process(node: CommonSettings) -> None:
    results = invoke_all(node, "state-fresh", [None, None, None])
    outputs = [r.output for r in results]
    assert len({o["pid"] for o in outputs}) == 3
    assert all(o["calls"] == 1 and o["env"] is None for o in outputs)


def test_new_instances_fork_from_the_zygote(node: CommonSettings) -> None:
    # Three invocations at once with a pool of one: the others get instances forked from the zygote.
    async def go() -> list[InvocationCompleted]:
        async with StokerClient(node) as client:
            calls = [client.invoke("hostile", {"action": "sleep-ok"}, timeout_s=30) for _ in range(3)]
            return list(await asyncio.gather(*calls))

    results = asyncio.run(go())
    assert all(r.status == "ok" for r in results), results
    assert "zygote" in {r.start for r in results}, [r.start for r in results]
    assert len({r.output["pid"] for r in results}) == 3


@pytest.mark.parametrize(
    ("action", "kind"),
    [("fork-bomb", "pids_limit"), ("balloon", "oom_killed"), ("spin", "timeout"), ("flood", "output_truncated"),
     ("suicide", "instance_died")],
)
def test_hostile_functions_get_a_terminal_result_and_the_node_keeps_serving(
    node: CommonSettings, action: str, kind: str
) -> None:
    started = time.monotonic()
    hostile, after = invoke_all(node, "hostile", [{"action": action}, {"action": "ok"}])
    assert hostile.status in ("error", "timeout"), hostile
    assert hostile.error is not None and hostile.error.kind == kind, hostile.error
    assert after.status == "ok", after
    assert time.monotonic() - started < 20
    if kind == "output_truncated":
        assert hostile.logs is not None and len(hostile.logs) <= 64 * 1024


def _read_topic(settings: CommonSettings, topic: str, until: Any, timeout_s: float = 30.0) -> Any:
    """Read ``topic`` from its beginning until ``until(record)`` returns something (that is returned)."""
    from aiokafka import AIOKafkaConsumer

    from events import codec

    async def go() -> Any:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=settings.bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
        )
        await consumer.start()
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for rec in records:
                        if rec.value is None:
                            continue
                        found = until(codec.decode(rec.value))
                        if found is not None:
                            return found
            raise AssertionError(f"nothing wanted on {topic} within {timeout_s} s")
        finally:
            await consumer.stop()

    return asyncio.run(go())


def test_a_function_clamp_holds_for_the_instances_it_starts_later(node: CommonSettings) -> None:
    """What the throttler sends an isolation node: a clamp of the function, before its instances exist."""
    from events import Clamp, NodeHeartbeat, NodeMetrics

    incarnation = _read_topic(
        node, node.topics.node, lambda r: r.incarnation if isinstance(r, NodeHeartbeat) else None
    )
    name = f"clamped-{uuid.uuid4().hex[:4]}"

    async def clamp_then_deploy() -> None:
        async with StokerClient(node) as client:
            cmd = Clamp(incarnation=incarnation, function=name, cpu_millis=150, reason="test")
            await client.send(cmd, node.topics.work("runtime-0"), name)
            source = package_code(node, FNS / "stateful")
            await client.put_function(FunctionSpec(name=name, entrypoint="handler:main", source=source, reuse="keep"))

    asyncio.run(clamp_then_deploy())
    [result] = invoke_all(node, name, [None])
    assert result.status == "ok", result

    def quota_of_its_instance(record: Any) -> Any:
        if isinstance(record, NodeMetrics):
            for m in record.instances:
                if m.instance == result.instance and m.function == name:  # not its samples as a generic one
                    return (m.cpu_quota_millis, m.clamped)
        return None

    assert _read_topic(node, node.topics.node_metric, quota_of_its_instance) == (150, True)
