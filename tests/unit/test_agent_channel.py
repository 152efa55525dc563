"""Unit tests of the agent's hot-path codecs: work-command decoding and the instance channel's framing."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import orjson
import pytest

from events import CodeSource, EnsurePool, Execute, FunctionSpec, InvocationRequested, codec
from services.agent.handlers import WORK_COMMANDS
from services.agent.instances import Channel, open_channel
from services.agent.work import CommandDecoder
from services.runtime.protocol import HEADER, ChannelClosed, FrameReader, encode_frame


def execute(inv_id: str, **spec: Any) -> bytes:
    source = CodeSource(digest="sha256:" + "ab" * 32)
    fn = FunctionSpec(name="hello", entrypoint="handler:main", source=source, updated_ms=1, **spec)
    inv = InvocationRequested(id=inv_id, function="hello", requested_ms=2)
    return codec.encode(Execute(invocation=inv, spec=fn, incarnation="i1", dispatched_ms=3))


def test_decoder_gives_the_records_codec_gives_and_validates_a_spec_once() -> None:
    decode = CommandDecoder(WORK_COMMANDS)
    first, second = decode(execute("a")), decode(execute("b"))
    assert first == codec.decode(execute("a"), WORK_COMMANDS)
    assert isinstance(first, Execute) and isinstance(second, Execute)
    assert second.invocation.id == "b"
    assert first.spec is second.spec  # the second Execute reused the validated spec
    other = decode(execute("c", timeout_s=5.0))
    assert isinstance(other, Execute) and other.spec.timeout_s == 5.0 and other.spec is not first.spec
    pool = decode(codec.encode(EnsurePool(incarnation="i1", generic=2)))
    assert pool == EnsurePool(incarnation="i1", generic=2)


def test_decoder_refuses_what_codec_refuses_with_the_same_reason() -> None:
    decode = CommandDecoder(WORK_COMMANDS)
    bad_spec = orjson.loads(execute("a"))
    bad_spec["spec"]["name"] = "Not A DNS Label"
    for raw in (b"\xff not json", orjson.dumps(bad_spec), b'{"type": "function.spec"}', None):
        with pytest.raises(codec.DecodeError) as ours:
            decode(raw)
        with pytest.raises(codec.DecodeError) as theirs:
            codec.decode(raw, WORK_COMMANDS)
        assert ours.value.reason == theirs.value.reason


def test_channel_delivers_whole_split_and_coalesced_frames_in_order() -> None:
    channel = Channel()
    frames = [encode_frame({"n": i, "pad": "x" * (i * 1000)}) for i in range(5)]
    got: list[Any] = []

    async def go() -> None:
        channel.data_received(frames[0])  # nobody waits yet: kept
        stream = b"".join(frames[1:])
        for cut in range(0, len(stream), 777):  # pieces that split headers and bodies
            channel.data_received(stream[cut : cut + 777])
        for _ in frames:
            got.append(await channel.receive())

    asyncio.run(go())
    assert [g["n"] for g in got] == list(range(5))


def test_channel_fails_the_waiter_on_garbage_and_on_close() -> None:
    async def go() -> None:
        garbage = Channel()
        waiting = asyncio.ensure_future(garbage.receive())
        await asyncio.sleep(0)
        garbage.data_received(HEADER.pack(3) + b"{{{")
        with pytest.raises(ChannelClosed):
            await waiting
        closed = Channel()
        waiting = asyncio.ensure_future(closed.receive())
        await asyncio.sleep(0)
        closed.connection_lost(None)
        with pytest.raises(ChannelClosed):
            await waiting
        with pytest.raises(ChannelClosed):
            await closed.receive()

    asyncio.run(go())


def test_frame_reader_and_channel_over_a_socketpair() -> None:
    """The runtime's blocking reader on one end, the agent's channel on the other: an echo loop."""
    agent_end, instance_end = socket.socketpair()

    def instance() -> None:
        frames = FrameReader(instance_end)
        try:
            while True:
                instance_end.sendall(encode_frame(frames.read()))
        except ChannelClosed:
            instance_end.close()

    thread = threading.Thread(target=instance, daemon=True)
    thread.start()

    async def go() -> list[Any]:
        channel = await open_channel(agent_end)
        out = []
        for payload in (None, {"a": 1}, "y" * 3_000_000, list(range(1000))):
            channel.send(encode_frame(payload))
            out.append(await channel.receive())
        channel.close()
        return out

    assert asyncio.run(go()) == [None, {"a": 1}, "y" * 3_000_000, list(range(1000))]
    thread.join(timeout=5)
    assert not thread.is_alive()
