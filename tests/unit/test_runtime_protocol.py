"""Unit tests of the agent-instance protocol's checks: a malformed frame is one clear ProtocolError."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.agent.instances import Channel, Instance, InstanceDied
from services.runtime import serve
from services.runtime.protocol import (
    ChannelClosed,
    ProtocolError,
    encode_frame,
    parse_hello,
    parse_reply,
    parse_request,
    parse_zygote_event,
)

LOAD = {"op": "load", "code_dir": "/code", "entrypoint": "h:main", "env": {}, "function": "f", "version": "1"}


@pytest.mark.parametrize(
    "frame",
    [LOAD, {"op": "invoke", "id": "i1", "payload": None}, {"op": "reset"}, {"op": "ping"}],
)
def test_well_formed_requests_pass_unchanged(frame: dict[str, Any]) -> None:
    assert parse_request(frame) is frame


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ([], "a request is an object"),
        ({"op": "bogus"}, "unknown op 'bogus'"),
        ({}, "unknown op None"),
        ({**LOAD, "code_dir": None}, "'code_dir' missing"),
        ({**LOAD, "env": ["A=1"]}, "'env' is not an object"),
        ({"op": "invoke"}, "'id' missing"),
    ],
)
def test_malformed_requests_are_refused_with_the_reason(frame: Any, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        parse_request(frame)


def test_a_protocol_error_is_a_channel_that_cannot_be_trusted() -> None:
    assert issubclass(ProtocolError, ChannelClosed)


def test_replies_need_a_boolean_ok_and_a_described_error() -> None:
    ok = {"ok": True, "output": 1, "exec_ms": 0.1}
    failed = {"ok": False, "error": {"kind": "ValueError", "message": "no"}}
    assert parse_reply("invoke", ok) is ok and parse_reply("invoke", failed) is failed
    for bad in (None, "ok", {"output": 1}, {"ok": 1}, {"ok": False}, {"ok": False, "error": {"kind": "X"}}):
        with pytest.raises(ProtocolError, match="'invoke'"):
            parse_reply("invoke", bad)


def test_hello_and_zygote_events() -> None:
    assert parse_hello({"op": "hello", "pid": 7}) == {"op": "hello", "pid": 7}
    for bad in ({"op": "hello"}, {"op": "forked", "pid": 1}, "hello"):
        with pytest.raises(ProtocolError, match="unexpected greeting"):
            parse_hello(bad)
    forked = {"op": "forked", "id": "a", "ok": True, "pid": 9}
    exited = {"op": "exited", "pid": 9, "code": -9}
    assert parse_zygote_event(forked) is forked and parse_zygote_event(exited) is exited
    assert parse_zygote_event({"op": "pong"}) is None
    for bad in ({"op": "forked", "id": "a", "ok": True}, {"op": "exited", "pid": 9}, [1]):
        with pytest.raises(ProtocolError):
            parse_zygote_event(bad)


def test_the_instance_answers_a_malformed_request_with_bad_request() -> None:
    # Only the requests that leave the process alone: a load or reset here would touch the test's own.
    runtime = serve.Runtime()
    assert serve.answer(runtime, {"op": "ping"}) == {"ok": True}
    assert serve.answer(runtime, {"op": "nope"}) == {
        "ok": False,
        "error": {"kind": "BadRequest", "message": "unknown op 'nope'"},
    }
    assert serve.answer(runtime, {"op": "invoke"})["error"]["kind"] == "BadRequest"  # type: ignore[typeddict-item]
    not_loaded = serve.answer(runtime, {"op": "invoke", "id": "i1"})
    assert not_loaded == {"ok": False, "error": {"kind": "NotSpecialized", "message": "no function loaded"}}
    runtime.loop.close()


class _Transport:
    def __init__(self, channel: Channel, answer: Any) -> None:
        self.channel, self.answer = channel, answer

    def write(self, data: bytes) -> None:
        asyncio.get_running_loop().call_soon(self.channel.data_received, encode_frame(self.answer))

    def close(self) -> None:
        pass


def test_an_instance_that_sends_a_malformed_reply_is_killed_as_died() -> None:
    async def go() -> None:
        inst = Instance(id="x", workdir=None, log_path=None)  # type: ignore[arg-type]
        inst.exited.set_result(0)  # no process to wait for
        inst.channel = Channel()
        inst.channel.connection_made(_Transport(inst.channel, {"output": 1}))  # type: ignore[arg-type]
        with pytest.raises(InstanceDied, match="broke the protocol: the reply to 'invoke' has no boolean 'ok'"):
            await inst.request({"op": "invoke", "id": "i1"}, 5.0)

    asyncio.run(go())
