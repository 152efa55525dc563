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


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ChannelClosed("channel closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame_sync(sock: socket.socket) -> Any:
    """Blocking read of one frame (instance side)."""
    (size,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if size > MAX_FRAME:
        raise ChannelClosed(f"frame of {size} bytes is over the limit")
    return orjson.loads(_recv_exact(sock, size))


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
