"""What an instance does: ``python -m services.runtime --fd N`` runs :func:`main`.

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
import linecache
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from services.runtime.protocol import (
    ChannelClosed,
    ErrorInfo,
    FrameReader,
    Hello,
    InvokeReply,
    InvokeRequest,
    LoadReply,
    LoadRequest,
    PingReply,
    ProtocolError,
    Reply,
    ResetReply,
    encode_frame,
    parse_request,
)

LOG_CAP = 64 * 1024
STDLIB = os.path.join(os.path.dirname(os.__file__), "")


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


class OutputTruncated(Exception):
    """The function printed more than its ``max_output_bytes``: the rest is not written."""


class _Budget:
    """What one invocation may still print, shared by its stdout and stderr."""

    def __init__(self, limit: int | None) -> None:
        self.left = limit
        self.exceeded = False


class _Tee(io.TextIOBase):
    """Copies what the function prints to the instance log and keeps a capped copy for the result."""

    def __init__(self, underlying: Any, budget: _Budget) -> None:
        self._underlying = underlying
        self._budget = budget
        self.captured: list[str] = []
        self._size = 0

    def write(self, s: str) -> int:
        budget = self._budget
        if budget.left is not None:
            if len(s) > budget.left:
                self._keep(s[: budget.left])
                budget.left, budget.exceeded = 0, True
                raise OutputTruncated("output over the function's max_output_bytes; the rest was dropped")
            budget.left -= len(s)
        self._keep(s)
        return len(s)

    def _keep(self, s: str) -> None:
        self._underlying.write(s)
        if self._size < LOG_CAP:
            self.captured.append(s[: LOG_CAP - self._size])
            self._size += len(s)

    def flush(self) -> None:
        self._underlying.flush()

    def text(self) -> str | None:
        return "".join(self.captured) or None


def error_of(exc: BaseException) -> ErrorInfo:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"kind": type(exc).__name__, "message": str(exc)[:4000], "traceback": "".join(tb[-6:])[-4000:]}


class Runtime:
    """One instance's state: the function loaded into it, and the generic state a reset returns to."""

    def __init__(self) -> None:
        self.handler: Callable[..., Any] | None = None
        self.wants_context = False
        self.function = ""
        self.version = ""
        self.code_dir: str | None = None
        self.loop = asyncio.new_event_loop()
        # The generic state a reset returns to.
        self.base_env = dict(os.environ)
        self.base_path = list(sys.path)
        self.base_cwd = os.getcwd()
        self.base_threads = set(threading.enumerate())
        self.base_modules = set(sys.modules)

    def reset(self) -> ResetReply:
        """Remove the function's part of the process: modules, sys.path, env, cwd, temp files."""
        removed = 0
        code_dir = self.code_dir
        if code_dir:
            prefix = os.path.join(code_dir, "")
            for name, module in list(sys.modules.items()):
                where = getattr(module, "__file__", None) or ""
                paths = list(getattr(module, "__path__", []) or [])
                if where.startswith(prefix) or any(str(p).startswith(prefix) for p in paths):
                    del sys.modules[name]
                    removed += 1
        # Anything else it added that is not the standard library's (modules made up at run time,
        # imports from paths it put on sys.path) goes too; stdlib imports may stay loaded.
        for name, module in list(sys.modules.items()):
            if name in self.base_modules or name in sys.builtin_module_names:
                continue
            where = getattr(module, "__file__", None) or ""
            if not where.startswith(STDLIB):
                del sys.modules[name]
                removed += 1
        sys.path[:] = self.base_path
        os.environ.clear()
        os.environ.update(self.base_env)
        os.chdir(self.base_cwd)
        tmp = self.base_env.get("TMPDIR")
        if tmp and os.path.isdir(tmp):
            for entry in os.listdir(tmp):
                path = os.path.join(tmp, entry)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
        tempfile.tempdir = None
        importlib.invalidate_caches()
        linecache.clearcache()  # the next function's tracebacks must not show this one's source
        self.handler, self.code_dir, self.function, self.version = None, None, "", ""
        # Threads cannot be stopped from outside: an instance that keeps some is not reused.
        left = [t.name for t in threading.enumerate() if t not in self.base_threads and t.is_alive()]
        return {"ok": True, "removed_modules": removed, "threads_left": left}

    def load(self, msg: LoadRequest) -> LoadReply:
        """Import the function's module from its code folder and keep its handler."""
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
        self.function, self.version, self.code_dir = msg["function"], msg["version"], code_dir
        return {"ok": True, "load_ms": (time.perf_counter() - started) * 1000}

    def invoke(self, msg: InvokeRequest) -> InvokeReply:
        """Run the loaded handler once, its prints copied to the log and (capped) to the reply."""
        if self.handler is None:
            return {"ok": False, "error": {"kind": "NotSpecialized", "message": "no function loaded"}}
        args: list[Any] = [msg.get("payload")]
        if self.wants_context:
            args.append(Context(msg["id"], self.function, self.version, msg.get("deadline_ms")))
        budget = _Budget(msg.get("max_output_bytes"))
        out_tee, err_tee = _Tee(sys.__stdout__, budget), _Tee(sys.__stderr__, budget)
        started = time.perf_counter()
        try:
            with contextlib.redirect_stdout(out_tee), contextlib.redirect_stderr(err_tee):
                result = self.handler(*args)
                if inspect.isawaitable(result):
                    result = self.loop.run_until_complete(result)
            exec_ms = (time.perf_counter() - started) * 1000
            reply: InvokeReply = {"ok": True, "output": result, "exec_ms": exec_ms}
            if budget.exceeded:  # it caught OutputTruncated and went on: still not a clean run
                reply = {
                    "ok": False,
                    "exec_ms": exec_ms,
                    "error": {"kind": "output_truncated", "message": str(OutputTruncated.__doc__).strip()},
                }
        except BaseException as exc:  # noqa: BLE001
            exec_ms = (time.perf_counter() - started) * 1000
            error: ErrorInfo = error_of(exc)
            if budget.exceeded:
                error = {
                    "kind": "output_truncated",
                    "message": str(OutputTruncated.__doc__).strip(),
                    "traceback": error.get("traceback"),
                }
            reply = {"ok": False, "error": error, "exec_ms": exec_ms}
        logs = "".join(filter(None, (out_tee.text(), err_tee.text())))
        if logs:
            reply["logs"] = logs[:LOG_CAP]
        return reply


def answer(runtime: Runtime, frame: Any) -> Reply:
    """The reply to one decoded frame; a frame that is no request gets a ``BadRequest`` error."""
    try:
        msg = parse_request(frame)
    except ProtocolError as exc:
        return {"ok": False, "error": {"kind": "BadRequest", "message": str(exc)}}
    if msg["op"] == "invoke":
        return runtime.invoke(msg)
    if msg["op"] == "load":
        return runtime.load(msg)
    if msg["op"] == "reset":
        return runtime.reset()
    ping: PingReply = {"ok": True}
    return ping


def serve(sock: socket.socket) -> None:
    """Say hello on the agent's channel, then answer its requests one after the other until it closes."""
    runtime = Runtime()
    frames = FrameReader(sock)
    hello: Hello = {"op": "hello", "pid": os.getpid()}
    sock.sendall(encode_frame(hello))
    while True:
        try:
            msg = frames.read()
        except ChannelClosed:
            return
        reply = answer(runtime, msg)
        try:
            frame = encode_frame(reply)
        except TypeError as exc:  # orjson refused the function's output
            error: ErrorInfo = {
                "kind": "OutputNotJSON",
                "message": f"the function returned a value that is not JSON: {exc}",
            }
            exec_ms = cast(InvokeReply, reply).get("exec_ms", 0.0)  # only an invoke's reply holds user output
            not_json: InvokeReply = {"ok": False, "error": error, "exec_ms": exec_ms}
            frame = encode_frame(not_json)
        sock.sendall(frame)


def main() -> None:
    parser = argparse.ArgumentParser(description="Stoker Python runtime instance")
    parser.add_argument("--fd", type=int, required=True, help="file descriptor of the agent channel")
    args = parser.parse_args()
    sock = socket.socket(fileno=args.fd)
    serve(sock)
