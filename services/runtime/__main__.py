"""An instance: ``python -m services.runtime --fd N``.

Starts generic (interpreter and runtime loaded), says hello, then serves frames from the
agent: ``load`` specializes it with a function's code, ``invoke`` runs the function once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import io
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.runtime.protocol import ChannelClosed, encode_frame, read_frame_sync

LOG_CAP = 64 * 1024


@dataclass(frozen=True)
class Context:
    """What a handler's second argument carries."""

    invocation_id: str
    function: str
    version: str
    deadline_ms: int | None

    def remaining_ms(self) -> float | None:
        """Milliseconds until the deadline, or None when there is none."""
        if self.deadline_ms is None:
            return None
        return self.deadline_ms - time.time() * 1000


class _Tee(io.TextIOBase):
    """Copies what the function prints to the instance log and keeps a capped copy for the result."""

    def __init__(self, underlying: Any) -> None:
        self._underlying = underlying
        self.captured: list[str] = []
        self._size = 0

    def write(self, s: str) -> int:
        self._underlying.write(s)
        if self._size < LOG_CAP:
            self.captured.append(s[: LOG_CAP - self._size])
            self._size += len(s)
        return len(s)

    def flush(self) -> None:
        self._underlying.flush()

    def text(self) -> str | None:
        return "".join(self.captured) or None


def error_of(exc: BaseException) -> dict[str, Any]:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"kind": type(exc).__name__, "message": str(exc)[:4000], "traceback": "".join(tb[-6:])[-4000:]}


class Runtime:
    def __init__(self) -> None:
        self.handler: Callable[..., Any] | None = None
        self.wants_context = False
        self.function = ""
        self.version = ""
        self.loop = asyncio.new_event_loop()

    def load(self, msg: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        code_dir = msg["code_dir"]
        module_name, _, attr = msg["entrypoint"].partition(":")
        try:
            os.environ.update(msg.get("env") or {})
            sys.path.insert(0, code_dir)
            deps = os.path.join(code_dir, ".deps")  # requirements the builder installed into the artifact
            if os.path.isdir(deps):
                sys.path.insert(1, deps)
            module = importlib.import_module(module_name)
            handler = getattr(module, attr)
            if not callable(handler):
                raise TypeError(f"{msg['entrypoint']} is not callable")
            params = [
                p
                for p in inspect.signature(handler).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            if not 1 <= len(params) <= 2:
                raise TypeError(f"{msg['entrypoint']} must take (event) or (event, context)")
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
            return {"ok": False, "error": error_of(exc)}
        self.handler, self.wants_context = handler, len(params) == 2
        self.function, self.version = msg["function"], msg["version"]
        return {"ok": True, "load_ms": (time.perf_counter() - started) * 1000}

    def invoke(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.handler is None:
            return {"ok": False, "error": {"kind": "NotSpecialized", "message": "no function loaded"}}
        args: list[Any] = [msg.get("payload")]
        if self.wants_context:
            args.append(Context(msg["id"], self.function, self.version, msg.get("deadline_ms")))
        out_tee, err_tee = _Tee(sys.__stdout__), _Tee(sys.__stderr__)
        started = time.perf_counter()
        try:
            with contextlib.redirect_stdout(out_tee), contextlib.redirect_stderr(err_tee):
                result = self.handler(*args)
                if inspect.isawaitable(result):
                    result = self.loop.run_until_complete(result)
            exec_ms = (time.perf_counter() - started) * 1000
            reply: dict[str, Any] = {"ok": True, "output": result, "exec_ms": exec_ms}
        except BaseException as exc:  # noqa: BLE001
            exec_ms = (time.perf_counter() - started) * 1000
            reply = {"ok": False, "error": error_of(exc), "exec_ms": exec_ms}
        logs = "".join(filter(None, (out_tee.text(), err_tee.text())))
        if logs:
            reply["logs"] = logs[:LOG_CAP]
        return reply


def serve(sock: socket.socket) -> None:
    runtime = Runtime()
    sock.sendall(encode_frame({"op": "hello", "pid": os.getpid()}))
    while True:
        try:
            msg = read_frame_sync(sock)
        except ChannelClosed:
            return
        op = msg.get("op")
        if op == "invoke":
            reply = runtime.invoke(msg)
        elif op == "load":
            reply = runtime.load(msg)
        elif op == "ping":
            reply = {"ok": True}
        else:
            reply = {"ok": False, "error": {"kind": "BadRequest", "message": f"unknown op {op!r}"}}
        try:
            frame = encode_frame(reply)
        except TypeError as exc:  # orjson refused the function's output
            error = {"kind": "OutputNotJSON", "message": f"the function returned a value that is not JSON: {exc}"}
            frame = encode_frame({"ok": False, "error": error, "exec_ms": reply.get("exec_ms", 0.0)})
        sock.sendall(frame)


def main() -> None:
    parser = argparse.ArgumentParser(description="Stoker Python runtime instance")
    parser.add_argument("--fd", type=int, required=True, help="file descriptor of the agent channel")
    args = parser.parse_args()
    sock = socket.socket(fileno=args.fd)
    serve(sock)


if __name__ == "__main__":
    main()
