"""SIGKILL a node agent with invocations in flight: each still ends in exactly one terminal result."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer

from events import InvocationRequested, now_ms
from services.common.client import StokerClient
from tests.e2e.conftest import processes_under, start_platform
from tests.helpers import RunningBroker, eventually

PROBE = Path(__file__).resolve().parents[1] / "integration" / "fns" / "probe"


def test_killed_agent_in_flight_work_is_retried_or_lost_exactly_once(
    kafka_broker: RunningBroker, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    prefix = f"nf{uuid.uuid4().hex[:6]}."
    # An existing Kafka (`--bootstrap`), with this test's own topic prefix.
    platform, _ = start_platform(
        home,
        "--bootstrap",
        kafka_broker.bootstrap,
        "--no-example",
        env_extra={"STOKER_TOPIC_PREFIX": prefix, "STOKER_BOOTSTRAP": kafka_broker.bootstrap},
    )
    try:
        platform.stoker("fn", "create", "slow", "--code", str(PROBE), "--entrypoint", "handler:main", "--timeout", "30")
        outcome = asyncio.run(_kill_during_work(platform.settings, platform.pids()))
    finally:
        platform.stoker("down", check=False)
    assert not processes_under(home), "processes left after `stoker down`"

    retried, lost_ids, on_killed, results, killed = outcome
    for inv_id, records in results.items():
        assert len(records) == 1, f"{inv_id} has {len(records)} terminal results: {records}"
    assert on_killed, "no invocation was running on the killed node"
    for inv_id, records in results.items():
        rec = records[0]
        if inv_id in on_killed and inv_id in lost_ids:
            # The supervisor restarts the killed agent at once, so the dispatcher may learn of the
            # death from the new incarnation before the deadline: then it re-runs it, past its
            # deadline (timeout, attempt 2); if the deadline passed first, it is reported lost.
            if rec["status"] == "lost":
                assert rec["error"]["kind"] == "node_lost", rec
            else:
                assert rec["status"] == "timeout" and rec["attempt"] == 2, rec
        elif inv_id in on_killed:
            # Re-run on the survivor or on the restarted agent (a new incarnation of the node).
            assert rec["status"] == "ok" and rec["attempt"] == 2, rec
        elif inv_id in lost_ids:
            assert rec["status"] == "timeout", rec  # ran on the survivor past its deadline
        else:
            assert rec["status"] == "ok" and rec["attempt"] == 1, rec
    if set(on_killed) - lost_ids:
        assert retried, "no invocation was re-run elsewhere"


async def _kill_during_work(
    settings: Any, pids: dict[str, int]
) -> tuple[list[str], set[str], list[str], dict[str, list[Any]], str]:
    topics = settings.topics
    consumer = AIOKafkaConsumer(
        topics.result,
        topics.work("runtime-0"),
        topics.work("runtime-1"),
        bootstrap_servers=settings.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    results: dict[str, list[Any]] = {}
    sent: dict[str, set[str]] = {"runtime-0": set(), "runtime-1": set()}

    async def drain() -> None:
        for records in (await consumer.getmany(timeout_ms=200)).values():
            for r in records:
                value = orjson.loads(r.value)
                if r.topic == topics.result:
                    results.setdefault(value["id"], []).append(value)
                elif value.get("type") == "work.execute":
                    sent[r.topic.rsplit(".", 1)[-1]].add(value["invocation"]["id"])

    try:
        async with StokerClient(settings) as client:
            no_deadline = [
                InvocationRequested(function="slow", payload={"action": "sleep", "seconds": 3}) for _ in range(3)
            ]
            # These may not be retried: their deadline passes before the node is declared dead.
            short = [
                InvocationRequested(
                    function="slow", payload={"action": "sleep", "seconds": 3}, deadline_ms=now_ms() + 2500
                )
                for _ in range(3)
            ]
            for inv in no_deadline + short:
                await client.publish(inv)

        async def work_reached_node() -> bool:
            await drain()
            return sum(len(ids) for ids in sent.values()) >= 6

        await eventually(work_reached_node, timeout_s=20, message="all work dispatched")
        await asyncio.sleep(0.5)  # let the instances start running it
        killed = max(sent, key=lambda node: len(sent[node]))
        sent_to_killed = sent[killed]
        os.killpg(pids[f"agent-{killed}"], signal.SIGKILL)
        all_ids = {i.id for i in no_deadline + short}

        async def all_done() -> bool:
            await drain()
            return all_ids <= set(results)

        await eventually(all_done, timeout_s=60, message="a terminal result for every invocation")
        await asyncio.sleep(2.0)  # any duplicate would arrive now
        await drain()
    finally:
        await consumer.stop()
    on_killed = sorted(i for i in sent_to_killed if i in all_ids)
    retried = [i for i in on_killed if results[i][0].get("attempt") == 2]
    return retried, {i.id for i in short}, on_killed, results, killed
