"""A real runtime instance process driven over its socketpair channel (no broker needed)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from services.agent.instances import InstanceDied, InstanceTimeout, spawn_instance

FNS = Path(__file__).parent / "fns"


def load_msg(fn: str = "probe", entrypoint: str = "handler:main", env: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "op": "load",
        "code_dir": str(FNS / fn),
        "entrypoint": entrypoint,
        "env": env or {},
        "function": fn,
        "version": "v1",
    }


def invoke_msg(payload: Any, invocation_id: str = "inv-1") -> dict[str, Any]:
    return {"op": "invoke", "id": invocation_id, "payload": payload, "deadline_ms": None}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_generic_instance_loads_code_and_keeps_module_state(tmp_path: Path) -> None:
    async def go() -> None:
        inst = await spawn_instance(tmp_path)
        try:
            assert inst.state == "generic" and inst.alive
            loaded = await inst.request(load_msg(env={"GREETING": "hi"}), 10)
            assert loaded["ok"], loaded
            first = await inst.request(invoke_msg({"action": "echo", "x": 1}), 5)
            second = await inst.request(invoke_msg({"action": "echo"}, "inv-2"), 5)
            assert first["ok"] and first["output"]["echo"] == {"action": "echo", "x": 1}
            assert first["output"]["id"] == "inv-1" and first["output"]["function"] == "probe"
            assert (first["output"]["calls"], second["output"]["calls"]) == (1, 2)  # keep: state survives
            assert first["output"]["pid"] == inst.pid
            env = await inst.request(invoke_msg({"action": "env"}), 5)
            # The function's env is applied; the agent's own environment is scrubbed.
            assert env["output"] == {"GREETING": "hi", "HOME_SET": False}
        finally:
            await inst.kill()
        assert not inst.alive

    run(go())


def test_errors_come_back_with_type_message_and_traceback(tmp_path: Path) -> None:
    async def go() -> None:
        inst = await spawn_instance(tmp_path)
        try:
            assert (await inst.request(load_msg(), 10))["ok"]
            reply = await inst.request(invoke_msg({"action": "raise"}), 5)
            assert not reply["ok"]
            assert reply["error"]["kind"] == "ValueError"
            assert reply["error"]["message"] == "boom from the function"
            assert "handler.py" in reply["error"]["traceback"]
            bad = await inst.request(invoke_msg({"action": "not-json"}), 5)
            assert bad["error"]["kind"] == "OutputNotJSON"
            printed = await inst.request(invoke_msg({"action": "print"}), 5)
            assert printed["output"] == "printed"
            assert "hello to stdout" in printed["logs"] and "hello to stderr" in printed["logs"]
            # The instance is still healthy after all of that.
            assert (await inst.request(invoke_msg({"action": "echo"}), 5))["ok"]
        finally:
            await inst.kill()
        assert "hello to stdout" in inst.log_path.read_text()

    run(go())


def test_async_handler_without_context(tmp_path: Path) -> None:
    async def go() -> None:
        inst = await spawn_instance(tmp_path)
        try:
            assert (await inst.request(load_msg(entrypoint="handler:amain"), 10))["ok"]
            reply = await inst.request(invoke_msg([1, 2]), 5)
            assert reply["output"] == {"async": True, "event": [1, 2]}
        finally:
            await inst.kill()

    run(go())


def test_import_failure_is_reported(tmp_path: Path) -> None:
    async def go() -> None:
        inst = await spawn_instance(tmp_path)
        try:
            reply = await inst.request(load_msg("broken"), 10)
            assert not reply["ok"] and reply["error"]["kind"] == "RuntimeError"
            missing = await inst.request(load_msg(entrypoint="handler:nope"), 10)
            assert missing["error"]["kind"] == "AttributeError"
        finally:
            await inst.kill()

    run(go())


def test_timeout_kills_the_instance_and_death_is_detected(tmp_path: Path) -> None:
    async def go() -> None:
        slow = await spawn_instance(tmp_path)
        assert (await slow.request(load_msg(), 10))["ok"]
        with pytest.raises(InstanceTimeout):
            await slow.request(invoke_msg({"action": "sleep", "seconds": 30}), 0.3)
        assert not slow.alive
        with pytest.raises(ProcessLookupError):
            os.kill(slow.pid, 0)  # type: ignore[arg-type]

        dying = await spawn_instance(tmp_path)
        assert (await dying.request(load_msg(), 10))["ok"]
        with pytest.raises(InstanceDied, match="exited with code 3"):
            await dying.request(invoke_msg({"action": "exit"}), 5)

    run(go())
