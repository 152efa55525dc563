"""The zygote: a runtime with its modules already imported, forking new instances on request.

``python -m services.runtime.zygote --fd N --preload json,email,...``. Starting an interpreter
and importing the runtime costs tens of milliseconds; ``os.fork`` of a process that already has
them costs about one. Each child moves into its own cgroup, gets its own session, rlimits and
(when the agent is root) its sandbox: namespaces, a new root and a uid of its own
(:mod:`services.agent.namespaces`), then serves its agent channel like any instance.

As root, the zygote keeps a fresh network namespace (loopback only) ready for its next child: it
moves into a new one right after each fork, while idle, so no fork waits for one.

``python -m services.runtime.zygote --fd N`` with ``STOKER_INSTANCE`` set is that child without a zygote (the
``spawn`` start kind): a new interpreter that reads its fork message from ``STOKER_INSTANCE``,
confines itself the same way and serves. It imports what it needs *before* it confines itself,
since the platform's files are not inside the sandbox.

Protocol on the control socket (frames as in ``protocol.py``): the agent sends ``fork`` with the
instance's channel socket attached (SCM_RIGHTS); the zygote answers ``forked`` with the pid, and
reports every child's end with ``exited`` (pid, exit code; negative = killed by that signal).
The zygote is single-threaded on purpose: forking a process with other threads is unsafe.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import os
import select
import signal
import socket
import sys
import time
import traceback
from typing import Any, cast

import orjson

from services.agent import namespaces, sandbox
from services.runtime.protocol import HEADER, ChannelClosed, Exited, Forked, ForkRequest, Hello, encode_frame

PR_SET_CHILD_SUBREAPER = 36


def _read_request(ctrl: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One frame plus the file descriptors that came with its first bytes."""
    header, fds, _flags, _addr = socket.recv_fds(ctrl, HEADER.size, 4)
    if not header:
        raise ChannelClosed("agent closed the control socket")
    while len(header) < HEADER.size:
        more = ctrl.recv(HEADER.size - len(header))
        if not more:
            raise ChannelClosed("agent closed the control socket")
        header += more
    (size,) = HEADER.unpack(header)
    body = b""
    while len(body) < size:
        chunk = ctrl.recv(size - len(body))
        if not chunk:
            raise ChannelClosed("agent closed the control socket")
        body += chunk
    return orjson.loads(body), list(fds)


def _become_instance(
    workdir: str, env: dict[str, str] | None, channel_fd: int, resolved: sandbox.ResolvedSandbox, python: str
) -> None:
    """Confine this process (cgroup, rlimits, namespaces and root, user) and serve the channel."""
    from services.runtime.serve import serve

    os.chdir(workdir)
    sandbox.apply_in_child(resolved)  # cgroup join, rlimits, namespaces, no_new_privs, user, parent-death signal
    if resolved.root is not None:
        # The venv's python is not in the sandbox; the interpreter it links to is, at its own path.
        sys.executable = sys._base_executable = python  # type: ignore[attr-defined]
    os.environ.clear()
    os.environ.update(env or {})
    serve(socket.socket(fileno=channel_fd))


def _child(
    msg: ForkRequest,
    channel_fd: int,
    ctrl: socket.socket,
    wake_fds: tuple[int, int],
    resolved: sandbox.ResolvedSandbox,
) -> None:
    """In the forked child: become the instance. Never returns into the zygote's loop."""
    code = 1
    try:
        os.setsid()  # its own session: the whole tree dies with one killpg
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        ctrl.close()
        for fd in wake_fds:
            os.close(fd)
        log_fd = os.open(msg["log_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        _become_instance(msg["workdir"], msg.get("env"), channel_fd, resolved, REAL_PYTHON)
        code = 0
    except BaseException:  # noqa: BLE001 - the child must never fall back into the zygote loop
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


REAL_PYTHON = os.path.realpath(sys.executable)
_children: set[int] = set()
"""Instances forked here. Their orphans are reaped here too (subreaper), but not reported."""
_netns_ready = False
"""True while this zygote sits in a fresh network namespace its next child may take."""


def _next_netns() -> None:
    global _netns_ready
    try:
        namespaces.new_netns()
        _netns_ready = True
    except OSError as exc:
        _netns_ready = False  # each child makes its own then (and fails loudly if it cannot)
        print(f"zygote: no network namespace ready: {exc}", file=sys.stderr)


def _fork(msg: ForkRequest, fds: list[int], ctrl: socket.socket, wake_fds: tuple[int, int]) -> Forked:
    global _netns_ready
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return {"op": "forked", "id": msg.get("id"), "ok": False, "error": "fork needs exactly one channel fd"}
    fields = dict(msg.get("sandbox", {}))
    if fields.get("instance_dir") and _netns_ready:
        fields["unshare_net"] = False  # the namespace this zygote is in now is the child's
    spec = sandbox.SandboxSpec(**fields)
    try:
        resolved = sandbox.resolve(spec)  # lookups happen here, in the zygote, not in the child
    except (OSError, ValueError, KeyError) as exc:
        os.close(fds[0])
        return {"op": "forked", "id": msg.get("id"), "ok": False, "error": f"sandbox: {exc}"}
    pid = os.fork()
    if pid == 0:
        _child(msg, fds[0], ctrl, wake_fds, resolved)
    _children.add(pid)
    os.close(fds[0])
    _netns_ready = False  # the child has it now: a new one once the reply is out
    return {"op": "forked", "id": msg.get("id"), "ok": True, "pid": pid}


def _reap() -> list[Exited]:
    ended: list[Exited] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        if pid not in _children:
            continue  # an orphan of an instance, reparented here: reaped, nobody waits for it
        _children.discard(pid)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        ended.append({"op": "exited", "pid": pid, "code": code})
    return ended


def serve(ctrl: socket.socket, preloaded: list[str], netns: bool = False) -> None:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup fd is what matters
    hello: Hello = {"op": "hello", "pid": os.getpid(), "preloaded": preloaded}
    ctrl.sendall(encode_frame(hello))
    while True:
        readable, _, _ = select.select([ctrl.fileno(), wake_r], [], [])
        if wake_r in readable:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            for ended in _reap():
                ctrl.sendall(encode_frame(ended))
        if ctrl.fileno() in readable:
            try:
                msg, fds = _read_request(ctrl)
            except ChannelClosed:
                return
            if msg.get("op") == "fork":
                ctrl.sendall(encode_frame(_fork(cast(ForkRequest, msg), fds, ctrl, (wake_r, wake_w))))
                if netns and not _netns_ready:
                    _next_netns()
            elif msg.get("op") == "ping":
                ctrl.sendall(encode_frame({"op": "pong"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fd", type=int, required=True, help="control socket from the agent")
    parser.add_argument("--preload", default="", help="comma-separated modules to import before forking")
    # With STOKER_INSTANCE set (the spawn start kind), the process is one instance instead.
    args = parser.parse_args()
    if "STOKER_INSTANCE" in os.environ:
        _spawned_instance(args.fd)
        return
    netns = os.geteuid() == 0  # root: the agent sandboxes every instance
    started = time.perf_counter()
    preloaded = []
    # What every instance needs, then what the operator asked for: imported once, shared by all.
    for name in ["services.runtime.serve", "json", *filter(None, args.preload.split(","))]:
        try:
            importlib.import_module(name)
            preloaded.append(name)
        except Exception as exc:  # noqa: BLE001 - a bad preload entry must not stop the node
            print(f"zygote: cannot preload {name}: {exc!r}", file=sys.stderr)
    print(
        f"zygote: preloaded {len(preloaded)} modules in {(time.perf_counter() - started) * 1000:.1f} ms",
        file=sys.stderr,
    )
    # Move everything imported so far out of the collector's reach: a child's first collection
    # would otherwise touch (and so copy) every page of the shared heap.
    gc.collect()
    gc.freeze()
    if netns:
        _next_netns()
    # What an instance leaves when it dies (its function's processes, killed with its cgroup)
    # becomes this zygote's to reap, not the host init's: no zombie keeps an instance uid in /proc.
    sandbox._call_prctl(sandbox._prctl(), PR_SET_CHILD_SUBREAPER, 1)
    serve(socket.socket(fileno=args.fd), preloaded, netns=netns)


def _spawned_instance(channel_fd: int) -> None:
    """The ``spawn`` start kind: this new interpreter is the instance; confine it, then serve."""
    import services.runtime.serve  # noqa: F401 - imported while the platform's files are still visible

    msg = orjson.loads(os.environ.pop("STOKER_INSTANCE"))  # workdir, env and sandbox (launcher._spawn_quarters)
    resolved = sandbox.resolve(sandbox.SandboxSpec(**msg.get("sandbox", {})))
    # resolve() took this process for the parent; the parent-death signal is about the agent.
    resolved = dataclasses.replace(resolved, parent_pid=os.getppid())
    _become_instance(msg["workdir"], msg.get("env"), channel_fd, resolved, REAL_PYTHON)


if __name__ == "__main__":
    main()
