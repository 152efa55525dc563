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
    frames = [encode_frame({"n": i, "pad": "x" * (i * 1000)}) for i in range(5)]  # none asked for: kept in order
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
            out.append(await channel.call(encode_frame(payload), 10.0))
        pipelined = [channel.call(encode_frame(i), 10.0) for i in range(20)]  # answered in order
        out.append([await f for f in pipelined])
        channel.close()
        return out

    assert asyncio.run(go()) == [None, {"a": 1}, "y" * 3_000_000, list(range(1000)), list(range(20))]
    thread.join(timeout=5)
    assert not thread.is_alive()


class _Transport:
    """What a Channel writes, and whether it was closed."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True


def test_a_queued_request_begins_when_the_one_ahead_is_answered() -> None:
    async def go() -> None:
        channel = Channel()
        channel.connection_made(_Transport())  # type: ignore[arg-type]
        began: list[str] = []
        first = channel.call(encode_frame("x"), 5.0, lambda: began.append("x"))
        second = channel.call(encode_frame("y"), 0.05, lambda: began.append("y"))
        assert began == ["x"]  # the second waits in line; its timeout has not started
        await asyncio.sleep(0.1)
        assert not second.done()
        channel.data_received(encode_frame({"answer": "x"}))
        assert began == ["x", "y"] and await first == {"answer": "x"}
        with pytest.raises(TimeoutError):  # now it runs, and runs out of time
            await second

    asyncio.run(go())


def test_what_was_queued_behind_a_timeout_or_a_death_did_not_start() -> None:
    from services.agent.instances import NotStarted

    async def go() -> None:
        channel = Channel()
        transport = _Transport()
        channel.connection_made(transport)  # type: ignore[arg-type]
        head = channel.call(encode_frame("x"), 0.02)
        behind = channel.call(encode_frame("y"), 5.0)
        with pytest.raises(TimeoutError):
            await head
        with pytest.raises(NotStarted):
            await behind
        channel.data_received(encode_frame("late"))  # an answer after the timeout counts for nobody
        with pytest.raises(NotStarted):  # nothing more begins on it
            channel.call(encode_frame("z"), 1.0)

        dying = Channel()
        dying.connection_made(_Transport())  # type: ignore[arg-type]
        running = dying.call(encode_frame("x"), None)
        queued = dying.call(encode_frame("y"), None)
        dying.connection_lost(None)
        with pytest.raises(ChannelClosed) as died:
            await running
        assert not isinstance(died.value, NotStarted)
        with pytest.raises(NotStarted):
            await queued

    asyncio.run(go())
