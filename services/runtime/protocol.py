"""Frames between an agent and its instances: a 4-byte big-endian length, then an orjson object.

The channel is a socketpair handed to the instance as a file descriptor, so the function's
own stdout and stderr stay free for its logs.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import orjson

HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024


class ChannelClosed(Exception):
    """The other side of the channel went away (the instance died, or the agent did)."""


def encode_frame(obj: Any) -> bytes:
    body = orjson.dumps(obj)
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes | memoryview) -> Any:
    """A frame's object; a body that is not JSON means the channel cannot be trusted any more."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ChannelClosed(f"undecodable frame: {exc}") from exc


class FrameReader:
    """Blocking frame reads (instance side) with one ``recv`` per frame when it comes in one piece.

    The agent writes each frame with one write, so a request nearly always arrives whole; reading
    the header and then the body cost two system calls per request.
    """

    CHUNK = 64 * 1024

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def read(self) -> Any:
        buffer = self._buffer
        if not buffer:
            data = self._sock.recv(self.CHUNK)
            if not data:
                raise ChannelClosed("channel closed")
            if len(data) >= HEADER.size:
                (size,) = HEADER.unpack_from(data)
                if len(data) == HEADER.size + size and size <= MAX_FRAME:
                    return orjson.loads(memoryview(data)[HEADER.size :])
            buffer += data
        while True:
            if len(buffer) >= HEADER.size:
                (size,) = HEADER.unpack_from(buffer)
                if size > MAX_FRAME:
                    raise ChannelClosed(f"frame of {size} bytes is over the limit")
                end = HEADER.size + size
                if len(buffer) >= end:
                    body = bytes(buffer[HEADER.size : end])
                    del buffer[:end]
                    return orjson.loads(body)
                need = end - len(buffer)
            else:
                need = HEADER.size - len(buffer)
            data = self._sock.recv(min(max(need, self.CHUNK), 1 << 20))  # big frames: a MiB at a time
            if not data:
                raise ChannelClosed("channel closed")
            buffer += data


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """Read one frame (agent side)."""
    try:
        header = await reader.readexactly(HEADER.size)
        (size,) = HEADER.unpack(header)
        if size > MAX_FRAME:
            raise ChannelClosed(f"frame of {size} bytes is over the limit")
        return orjson.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
        raise ChannelClosed("instance closed its channel") from exc
