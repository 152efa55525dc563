"""A user's session with the embedded platform: up, functions, four ways to invoke, faults, down."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.e2e.conftest import Platform
from tests.helpers import assert_eventually, eventually, own_trace

PROBE = Path(__file__).resolve().parents[1] / "integration" / "fns" / "probe"


def test_up_deploys_and_invokes_the_example(platform: Platform) -> None:
    out = platform.up_output  # type: ignore[attr-defined]
    assert "Hello, Stoker!" in out and '"status": "ok"' in out
    assert platform.http in out.replace("\n", "")


def test_status_shows_broker_services_nodes_instances_and_functions(platform: Platform) -> None:
    status = platform.status()
    assert status["broker"]["reachable"] is True
    assert set(status["services"]) >= {"gateway", "dispatcher", "poolmgr", "agent-runtime-0", "agent-runtime-1"}
    assert all(s["ready"] for s in status["services"].values())
    assert {"runtime-0", "runtime-1"} <= set(status["nodes"])

    def pools_filled() -> dict[str, Any]:
        status = platform.status()
        for node in ("runtime-0", "runtime-1"):
            assert status["nodes"][node]["up"] is True
            states = [i["state"] for i in status["nodes"][node]["instances"]]
            assert states.count("generic") >= 1, states  # the pool is kept filled (seen in the next heartbeat)
        return status

    status = assert_eventually(pools_filled, timeout_s=10, message="a generic instance on each runtime node")
    assert "hello" in status["functions"]
    human = platform.stoker("status").stdout
    assert "runtime-0" in human and "hello" in human


def test_function_lifecycle(platform: Platform) -> None:
    platform.stoker(
        "fn",
        "create",
        "lifecycle",
        "--code",
        str(PROBE),
        "--entrypoint",
        "handler:main",
        "--memory",
        "128",
        "--timeout",
        "5",
        "--concurrency",
        "4",
    )
    again = platform.stoker(
        "fn", "create", "lifecycle", "--code", str(PROBE), "--entrypoint", "handler:main", check=False
    )
    assert again.returncode != 0 and "exists" in again.stderr
    spec = orjson.loads(platform.stoker("fn", "get", "lifecycle").stdout)
    assert (spec["memory_mb"], spec["timeout_s"], spec["concurrency"], spec["revision"]) == (128, 5.0, 4, 1)
    assert spec["source"]["kind"] == "archive" and spec["source"]["digest"].startswith("sha256:")
    platform.stoker("fn", "update", "lifecycle", "--timeout", "7", "--env", "GREETING=hey")
    updated = orjson.loads(platform.stoker("fn", "get", "lifecycle").stdout)
    assert (updated["timeout_s"], updated["revision"], updated["env"]) == (7.0, 2, {"GREETING": "hey"})
    listed = orjson.loads(platform.stoker("fn", "list", "--json").stdout)
    assert "lifecycle" in [s["name"] for s in listed]
    with platform.client() as http:
        assert http.post("/fn/lifecycle", json={"action": "env"}).json()["GREETING"] == "hey"
    platform.stoker("fn", "delete", "lifecycle")
    gone = platform.stoker("fn", "get", "lifecycle", check=False)
    assert gone.returncode != 0 and "no function" in gone.stderr
    with platform.client() as http:
        assert_eventually(lambda: http.post("/fn/lifecycle", json={}).status_code == 404)


def test_four_ways_to_invoke_give_the_same_result(platform: Platform) -> None:
    platform.stoker("fn", "create", "echo", "--code", str(PROBE), "--entrypoint", "handler:main")
    payload = {"action": "echo", "x": 1}

    cli = platform.stoker("fn", "invoke", "echo", "--data", orjson.dumps(payload).decode())
    cli_result = orjson.loads(cli.stdout)
    assert cli_result["status"] == "ok" and cli_result["output"]["echo"] == payload

    with platform.client() as http:
        sync = http.post("/fn/echo", json=payload)
        assert sync.status_code == 200 and sync.json()["echo"] == payload
        assert sync.headers["x-stoker-start"] in ("warm", "pool", "spawn")
        assert "total;dur=" in sync.headers["server-timing"]

        accepted = http.post("/async/fn/echo", json=payload)
        assert accepted.status_code == 202
        inv_id = accepted.json()["id"]
        final = assert_eventually(lambda: (r := http.get(f"/invocations/{inv_id}")).status_code == 200 and r)
        assert final.json()["status"] == "ok" and final.json()["output"]["echo"] == payload
        assert http.get("/invocations/does-not-exist").status_code == 404

    raw_id = uuid.uuid4().hex
    raw = orjson.dumps(
        {
            "type": "invocation.requested",
            "version": 1,
            "id": raw_id,
            "function": "echo",
            "payload": payload,
            "reply_to": None,
            "deadline_ms": None,
        }
    )
    results = asyncio.run(_publish_and_collect(platform, raw, raw_id))
    assert len(results) == 1, results  # exactly one terminal record
    assert results[0]["status"] == "ok" and results[0]["output"]["echo"] == payload


async def _publish_and_collect(platform: Platform, raw: bytes, inv_id: str) -> list[dict[str, Any]]:
    settings = platform.settings
    consumer = AIOKafkaConsumer(
        settings.topics.result,
        bootstrap_servers=settings.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap)
    await producer.start()
    found: list[dict[str, Any]] = []
    try:
        await producer.send_and_wait(settings.topics.invocation, raw, key=b"echo")

        async def seen() -> bool:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                found.extend(v for r in records if (v := orjson.loads(r.value))["id"] == inv_id)
            return bool(found)

        await eventually(seen, timeout_s=30, message="the result record")
        await asyncio.sleep(1.0)
        await seen()
    finally:
        await producer.stop()
        await consumer.stop()
    return found


def test_bad_http_input_gets_the_right_4xx_and_publishes_nothing(platform: Platform) -> None:
    settings = platform.settings

    async def end_offsets() -> dict[Any, int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap)
        await consumer.start()
        try:
            parts = [
                TopicPartition(settings.topics.invocation, p)
                for p in consumer.partitions_for_topic(settings.topics.invocation) or []
            ]
            if not parts:
                await consumer.topics()
                consumer._client.add_topic(settings.topics.invocation)  # noqa: SLF001
                await consumer._client.force_metadata_update()  # noqa: SLF001
                parts = [
                    TopicPartition(settings.topics.invocation, p)
                    for p in consumer.partitions_for_topic(settings.topics.invocation) or []
                ]
            return dict(await consumer.end_offsets(parts))
        finally:
            await consumer.stop()

    before = asyncio.run(end_offsets())
    with platform.client() as http:
        missing = http.post("/fn/no-such-function", json={})
        assert missing.status_code == 404 and "no-such-function" in missing.json()["error"]
        bad = http.post("/fn/hello", content=b'{"unterminated": ', headers={"content-type": "application/json"})
        assert bad.status_code == 400 and "JSON" in bad.json()["error"]
        big = http.post("/fn/hello", content=b'"' + b"x" * (6 * 1024 * 1024 + 10) + b'"')
        assert big.status_code == 413 and "limit" in big.json()["error"]
    assert asyncio.run(end_offsets()) == before, "a rejected request must not be published"


def test_function_faults_each_get_a_terminal_result(platform: Platform) -> None:
    platform.stoker("fn", "create", "faulty", "--code", str(PROBE), "--entrypoint", "handler:main", "--timeout", "1")
    with platform.client() as http:
        raised = http.post("/fn/faulty", json={"action": "raise"})
        assert raised.status_code == 500
        assert raised.json()["error"]["kind"] == "ValueError" and raised.json()["error"]["traceback"]
        slow = http.post("/fn/faulty", json={"action": "sleep", "seconds": 10})
        assert slow.status_code == 504 and slow.json()["status"] == "timeout"
        died = http.post("/fn/faulty", json={"action": "exit"})
        assert died.status_code == 500 and died.json()["error"]["kind"] == "instance_died"
        assert http.post("/fn/faulty", json={"action": "echo"}).status_code == 200
    failed = platform.stoker("fn", "invoke", "faulty", "--data", '{"action": "raise"}', check=False)
    assert failed.returncode != 0 and orjson.loads(failed.stdout)["status"] == "error"
    printed = platform.stoker("fn", "invoke", "faulty", "--data", '{"action": "print"}')
    assert "hello to stdout" in orjson.loads(printed.stdout)["logs"]
    logs = platform.stoker("fn", "logs", "faulty").stdout
    assert "hello to stdout" in logs and "hello to stderr" in logs


def test_trace_links_every_stage_of_an_invocation(platform: Platform) -> None:
    with platform.client() as http:
        response = http.post("/fn/hello", json={"name": "trace"})
    inv_id = response.headers["x-stoker-invocation-id"]

    def tree() -> str:
        out = platform.stoker("trace", inv_id, check=False).stdout
        wanted = (
            "POST /fn/{name}",
            "invocation publish",
            "invocation process",
            "work.runtime-",
            "stoker start",
            "stoker exec",
            "result publish",
        )
        return out if all(w in own_trace(out)[0] for w in wanted) else ""

    out = assert_eventually(tree, timeout_s=15, message="a complete span tree")
    own, trees = own_trace(out)
    assert trees == 1  # one trace across gateway, dispatcher and agent
    for service in ("gateway", "dispatcher", "agent-runtime-"):
        assert service in own


def test_monitor_tails_topics_readably(platform: Platform) -> None:
    out = platform.stoker("monitor", "result", "--from-beginning", "--limit", "3", "--duration", "20").stdout
    lines = [line for line in out.splitlines() if "invocation.completed" in line]
    assert len(lines) == 3 and "status=" in lines[0] and "function=" in lines[0]


def test_spine_benchmark_runs_at_a_tiny_size(platform: Platform, tmp_path: Path) -> None:
    """The benchmark program must not rot: run it with a few samples against the live platform."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "loadtest.spine", "--warm", "10", "--cold", "2", "--bare", "10", "--out", str(tmp_path)],
        env=platform.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = orjson.loads(next(tmp_path.glob("spine-*.json")).read_bytes())
    assert report["warm_invocation_ms"]["n"] == 10 and report["warm_start_kinds"] == {"warm": 10}
    assert report["first_invocation_ms"]["n"] == 2 and report["bare_kafka_round_trip_ms"]["p50"] > 0


def test_broker_unreachable_gives_503_never_2xx(platform: Platform) -> None:
    """Runs last in this module: it kills the platform's broker."""
    broker_pid = platform.pids()["broker"]
    os.killpg(broker_pid, signal.SIGKILL)
    assert_eventually(lambda: platform.status()["broker"]["reachable"] is False, timeout_s=10)
    with platform.client() as http:
        started = time.monotonic()
        answer = http.post("/fn/hello", json={"name": "nobody"})
        assert answer.status_code == 503, answer.text
        assert "not accepted" in answer.json()["error"]
        assert time.monotonic() - started < 30
