"""Workflows through the platform: create (with errors by line), run four ways, failures, traces,
prewarm of later steps, and an engine killed mid-run that completes every run exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from events import InvocationRequested
from services.cli import platform as embedded
from services.common.client import StokerClient
from tests.e2e.conftest import Platform, processes_under, start_platform
from tests.helpers import assert_eventually, eventually, own_trace

FNS = Path(__file__).resolve().parents[1] / "integration" / "fns"

PIPELINE = """
steps:
  - id: first
    function: probe
    input: {action: echo, who: $.input.who}
  - id: fan
    function: probe
    after: [first]
    map: $.input.items
    max_parallel: 3
    input: {action: echo, item: $.item, at: $.index}
  - id: maybe
    function: probe
    after: [first]
    when: $.input.loud == true
    input: {action: echo, loud: true}
  - id: join
    function: probe
    after: [fan, first]
    input: {action: echo, n: "$.steps.fan.output[*].echo.item"}
output:
  who: $.steps.first.output.echo.who
  items: $.steps.join.output.echo.n
  loud: $.steps.maybe.status
"""

BROKEN = """
steps:
  - id: a
    function: probe
    after: [c]
  - id: b
    function: no-such-function
  - id: c
    function: probe
    after: [a]
    input: {x: "$.steps.a.output[["}
"""

FAILING = """
steps:
  - id: fine
    function: probe
    input: {action: echo}
  - id: boom
    function: probe
    after: [fine]
    input: {action: raise}
    retries: 1
    backoff_s: 0.1
"""

SLOW = """
steps:
  - id: nap
    function: probe
    input: {action: sleep, seconds: 2}
  - id: after-nap
    function: probe
    after: [nap]
    input: {action: echo, done: true}
"""


@pytest.fixture(scope="module")
def flows(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Platform, Path]]:
    home = tmp_path_factory.mktemp("flows")
    platform, _ = start_platform(home, "--no-example")
    files = tmp_path_factory.mktemp("yaml")
    for name, text in (("pipeline", PIPELINE), ("broken", BROKEN), ("failing", FAILING), ("slow", SLOW)):
        (files / f"{name}.yaml").write_text(text)
    try:
        platform.stoker(
            "fn", "create", "probe", "--code", str(FNS / "probe"), "--entrypoint", "handler:main", "--timeout", "10"
        )
        yield platform, files
    finally:
        platform.stoker("down", check=False)
        assert not processes_under(home)


def test_invalid_workflows_are_rejected_with_lines(flows: tuple[Platform, Path]) -> None:
    platform, files = flows
    out = platform.stoker("wf", "create", "broken", "-f", str(files / "broken.yaml"), check=False)
    assert out.returncode != 0
    text = out.stderr.replace("\n", " ")
    assert "cycle" in text and "no-such-function" in text and "broken.yaml:" in text
    assert "broken" not in platform.stoker("wf", "list").stdout


def test_a_workflow_runs_like_a_function(flows: tuple[Platform, Path]) -> None:
    platform, files = flows
    platform.stoker("wf", "create", "pipeline", "-f", str(files / "pipeline.yaml"))
    assert "pipeline" in platform.stoker("wf", "list").stdout
    assert "max_parallel: 3" in platform.stoker("wf", "get", "pipeline").stdout
    data = {"who": "cli", "items": ["a", "b", "c", "d"], "loud": False}
    via_cli = orjson.loads(platform.stoker("wf", "run", "pipeline", "--data", orjson.dumps(data).decode()).stdout)
    assert via_cli["status"] == "ok"
    assert via_cli["output"] == {"who": "cli", "items": ["a", "b", "c", "d"], "loud": "skipped"}
    with platform.client() as http:
        sync = http.post("/fn/pipeline", json={**data, "loud": True})
        assert sync.status_code == 200, sync.text
        assert sync.json()["loud"] == "ok"
        accepted = http.post("/async/fn/pipeline", json=data)
        assert accepted.status_code == 202
        run_id = accepted.json()["id"]
        final = assert_eventually(lambda: (r := http.get(f"/invocations/{run_id}")).status_code == 200 and r)
        assert final.json()["output"]["items"] == ["a", "b", "c", "d"]

    # Any Kafka client may start a run with the documented record.
    async def raw() -> Any:
        async with StokerClient(platform.settings) as client:
            return await client.invoke("pipeline", data, timeout_s=60)

    assert asyncio.run(raw()).output["who"] == "cli"

    status = orjson.loads(platform.stoker("wf", "run-status", run_id, "--json").stdout)
    steps = {(s["step"], s["item"]): s for s in status["steps"]}
    assert status["status"] == "ok" and {("first", None), ("join", None), ("maybe", None)} <= set(steps)
    assert [steps[("fan", i)]["status"] for i in range(4)] == ["ok"] * 4
    assert steps[("maybe", None)]["status"] == "skipped"
    assert all(
        s["start"] in ("warm", "prewarmed", "pool", "zygote", "spawn") for s in status["steps"] if s["status"] == "ok"
    )
    runs = platform.stoker("wf", "runs", "pipeline").stdout
    assert run_id in runs and "ok" in runs

    def one_trace() -> str:
        out = platform.stoker("trace", run_id, check=False).stdout
        own, trees = own_trace(out)
        return own if own.count("workflow step") >= 6 and trees == 1 else ""

    assert_eventually(one_trace, timeout_s=15, message="one trace with a span per step")

    prewarms = platform.stoker("monitor", "prewarm", "--from-beginning", "--duration", "3").stdout
    assert "prewarm.requested function=probe" in prewarms  # later steps were prewarmed ahead


def test_a_failing_step_fails_the_run_after_its_retries(flows: tuple[Platform, Path]) -> None:
    platform, files = flows
    platform.stoker("wf", "create", "failing", "-f", str(files / "failing.yaml"))
    out = platform.stoker("wf", "run", "failing", check=False)
    assert out.returncode != 0
    result = orjson.loads(out.stdout)
    assert result["status"] == "error" and "step boom failed" in result["error"]["kind"]
    status = orjson.loads(platform.stoker("wf", "run-status", result["id"], "--json").stdout)
    attempts = [s for s in status["steps"] if s["step"] == "boom"]
    assert [a["attempt"] for a in attempts] == [1, 2] and all(a["status"] == "error" for a in attempts)


def test_an_engine_killed_mid_run_finishes_every_run_exactly_once(flows: tuple[Platform, Path]) -> None:
    platform, files = flows
    platform.stoker("wf", "create", "slow", "-f", str(files / "slow.yaml"))
    settings = platform.settings
    runs = [InvocationRequested(function="slow", payload={}) for _ in range(3)]

    async def go() -> dict[str, list[Any]]:
        consumer = AIOKafkaConsumer(
            settings.topics.result,
            bootstrap_servers=settings.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await consumer.start()
        found: dict[str, list[Any]] = {}
        try:
            async with StokerClient(settings) as client:
                for inv in runs:
                    await client.publish(inv)
            await asyncio.sleep(1.0)  # the first steps are running now
            os.killpg(embedded.read_pid(settings, "workflow"), signal.SIGKILL)  # type: ignore[arg-type]
            await asyncio.sleep(0.5)
            config = embedded.PlatformConfig(common=settings, embedded_broker=False)
            engine = next(c for c in config.components() if c.name == "workflow")
            os.environ.update({k: v for k, v in platform.env.items() if k.startswith("STOKER_")})
            embedded.start_component(config, engine)
            embedded.wait_ready(settings, ["workflow"])

            async def all_done() -> bool:
                for records in (await consumer.getmany(timeout_ms=300)).values():
                    for r in records:
                        value = orjson.loads(r.value)
                        if value["id"] in {i.id for i in runs}:
                            found.setdefault(value["id"], []).append(value)
                return len(found) == len(runs)

            await eventually(all_done, timeout_s=60, message="a result for every run")
            await asyncio.sleep(2.0)
            await all_done()
        finally:
            await consumer.stop()
        return found

    found = asyncio.run(go())
    for inv in runs:
        assert len(found[inv.id]) == 1, found[inv.id]
        assert found[inv.id][0]["status"] == "ok" and found[inv.id][0]["output"]["after-nap"]["echo"]["done"]
