"""Frames between an agent and its instances: a 4-byte big-endian length, then an orjson object.

The channel is a socketpair handed to the instance as a file descriptor, so the function's
own stdout and stderr stay free for its logs.

The messages, one ``TypedDict`` each: requests carry an ``op``; an instance answers every request
with a reply that carries ``ok``, in the order the requests came. An instance says
:class:`Hello` once, before any request. The zygote's control socket has its own
(:class:`ForkRequest`, :class:`Forked`, :class:`Exited`). :func:`parse_request` and
:func:`parse_reply` check a decoded frame's shape where it comes in, so a malformed frame is one
:class:`ProtocolError` naming what is wrong, not a ``KeyError`` further on.

The instance imports this module before it is confined: nothing here may import lazily.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any, Literal, NotRequired, TypedDict, cast

import orjson

HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024


class ChannelClosed(Exception):
    """The other side of the channel went away (the instance died, or the agent did)."""


class ProtocolError(ChannelClosed):
    """A frame decoded but is not a message of this protocol: the channel cannot be trusted any more."""


# --- agent -> instance -------------------------------------------------------------------------


class LoadRequest(TypedDict):
    """Specialize a generic instance with a function's code."""

    op: Literal["load"]
    code_dir: str
    """The code's folder as the instance sees it (``/code`` inside a sandbox)."""
    entrypoint: str
    """``module:attribute`` of the handler, taking ``(event)`` or ``(event, context)``."""
    env: NotRequired[dict[str, str] | None]
    """The function's own environment, added to the instance's."""
    function: str
    version: str


class InvokeRequest(TypedDict):
    """Run the loaded function once."""

    op: Literal["invoke"]
    id: str
    """The invocation's id (the context's ``invocation_id``)."""
    payload: NotRequired[Any]
    deadline_ms: NotRequired[int | None]
    """Epoch milliseconds; the context's ``remaining_ms`` counts down to it."""
    max_output_bytes: NotRequired[int | None]
    """What the function may print (stdout and stderr together) before the rest is dropped."""


class ResetRequest(TypedDict):
    """Take the function's part out of the process: generic again, if it left no threads."""

    op: Literal["reset"]


class PingRequest(TypedDict):
    """Are you there (answered with a bare ``{"ok": true}``)."""

    op: Literal["ping"]


Request = LoadRequest | InvokeRequest | ResetRequest | PingRequest
Op = Literal["load", "invoke", "reset", "ping"]


# --- instance -> agent -------------------------------------------------------------------------


class Hello(TypedDict):
    """An instance's (or the zygote's) first frame: it is ready for requests."""

    op: Literal["hello"]
    pid: int
    preloaded: NotRequired[list[str]]
    """The zygote's only: the modules it imported for its children."""


class ErrorInfo(TypedDict):
    """Why a request failed."""

    kind: str
    """The exception's class name, or the runtime's own kind (``output_truncated``, ``BadRequest``...)."""
    message: str
    traceback: NotRequired[str | None]


class LoadReply(TypedDict):
    ok: bool
    load_ms: NotRequired[float]
    """How long the import took (when ``ok``)."""
    error: NotRequired[ErrorInfo]


class InvokeReply(TypedDict):
    ok: bool
    output: NotRequired[Any]
    """What the function returned (when ``ok``)."""
    exec_ms: NotRequired[float]
    error: NotRequired[ErrorInfo]
    logs: NotRequired[str]
    """What it printed, capped (``serve.LOG_CAP``)."""


class ResetReply(TypedDict):
    ok: bool
    removed_modules: NotRequired[int]
    threads_left: NotRequired[list[str]]
    """Threads it started that are still running: an instance that keeps any is not reused."""
    error: NotRequired[ErrorInfo]


class PingReply(TypedDict):
    ok: bool
    error: NotRequired[ErrorInfo]


Reply = LoadReply | InvokeReply | ResetReply | PingReply


# --- agent <-> zygote (its control socket) ----------------------------------------------------


class ForkRequest(TypedDict):
    """Fork a new instance; its channel's end travels with the frame (SCM_RIGHTS)."""

    op: Literal["fork"]
    id: str
    """The instance's id: the :class:`Forked` reply carries it back."""
    workdir: str
    log_path: str
    """Where the child's stdout and stderr go."""
    env: dict[str, str]
    sandbox: dict[str, Any]
    """The fields of a ``services.agent.sandbox.SandboxSpec``."""


class Forked(TypedDict):
    op: Literal["forked"]
    id: str | None
    ok: bool
    pid: NotRequired[int]
    error: NotRequired[str]


class Exited(TypedDict):
    """One of the zygote's children ended."""

    op: Literal["exited"]
    pid: int
    code: int
    """Its exit code; negative: killed by that signal."""


# --- checks at the boundary --------------------------------------------------------------------

_REQUIRED: dict[str, tuple[tuple[str, type | tuple[type, ...]], ...]] = {
    "load": (("code_dir", str), ("entrypoint", str), ("function", str), ("version", str)),
    "invoke": (("id", str),),
    "reset": (),
    "ping": (),
}


def parse_request(obj: Any) -> Request:
    """A decoded frame as the request it is; :class:`ProtocolError` (with the reason) if it is none."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"a request is an object, not {type(obj).__name__}")
    op = obj.get("op")
    fields = _REQUIRED.get(op) if isinstance(op, str) else None
    if fields is None:
        raise ProtocolError(f"unknown op {op!r}")
    for name, kind in fields:
        if not isinstance(obj.get(name), kind):
            raise ProtocolError(f"{op}: {name!r} missing or not a {getattr(kind, '__name__', kind)}")
    if op == "load" and not isinstance(obj.get("env") or {}, dict):
        raise ProtocolError("load: 'env' is not an object")
    return cast(Request, obj)


def parse_reply(op: str, obj: Any) -> Any:
    """The reply to a request of ``op``, checked: an object with a boolean ``ok``, and, when it
    failed, an ``error`` with a ``kind`` and a ``message``. Raises :class:`ProtocolError`.

    Typed ``Any`` for the callers that read replies as plain dicts; the shape is the reply
    ``TypedDict`` of ``op`` (:data:`Reply`).
    """
    if not isinstance(obj, dict):
        raise ProtocolError(f"the reply to {op!r} is not an object: {type(obj).__name__}")
    ok = obj.get("ok")
    if not isinstance(ok, bool):
        raise ProtocolError(f"the reply to {op!r} has no boolean 'ok': {str(obj)[:200]}")
    if not ok:
        error = obj.get("error")
        if not isinstance(error, dict) or not (
            isinstance(error.get("kind"), str) and isinstance(error.get("message"), str)
        ):
            raise ProtocolError(f"the failed reply to {op!r} has no error kind and message: {str(obj)[:200]}")
    return obj


def parse_hello(obj: Any) -> Hello:
    """An instance's or the zygote's first frame; :class:`ProtocolError` if it is anything else."""
    if not (isinstance(obj, dict) and obj.get("op") == "hello" and isinstance(obj.get("pid"), int)):
        raise ProtocolError(f"unexpected greeting {obj!r}")
    return cast(Hello, obj)


def parse_zygote_event(obj: Any) -> Forked | Exited | None:
    """A frame from the zygote: :class:`Forked` or :class:`Exited`; None for what the agent does
    not wait for (a ``pong``). Raises :class:`ProtocolError` for a malformed one."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"the zygote sent {type(obj).__name__}, not an object")
    op = obj.get("op")
    if op == "forked":
        if not isinstance(obj.get("ok"), bool) or (obj["ok"] and not isinstance(obj.get("pid"), int)):
            raise ProtocolError(f"malformed forked: {obj!r}")
        return cast(Forked, obj)
    if op == "exited":
        if not (isinstance(obj.get("pid"), int) and isinstance(obj.get("code"), int)):
            raise ProtocolError(f"malformed exited: {obj!r}")
        return cast(Exited, obj)
    return None


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
