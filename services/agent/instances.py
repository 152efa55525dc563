"""Runtime instances: child processes the agent talks to over a socketpair.

An instance starts one of two ways: forked from the node's zygote (a runtime with its modules
already imported; the fast way) or spawned as a new interpreter (when there is no zygote). Either
way it runs in its own cgroup and session, with rlimits, a scrubbed environment, its own working
directory, and an unprivileged user when the agent runs as root and the interpreter allows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from events.instance import InstanceState
from services.agent import sandbox
from services.agent.cgroups import InstanceCgroup, oom_killed
from services.runtime.protocol import (
    HEADER,
    MAX_FRAME,
    ChannelClosed,
    Forked,
    ForkRequest,
    ProtocolError,
    decode_body,
    encode_frame,
    parse_hello,
    parse_reply,
    parse_zygote_event,
    read_frame,
)

SCRUBBED_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONHASHSEED")
REPO_ROOT = Path(__file__).resolve().parents[2]

Origin = Literal["zygote", "spawn"]


class InstanceDied(Exception):
    """The instance's process went away while it was being used."""

    def __init__(self, message: str, kind: str = "instance_died") -> None:
        super().__init__(message)
        self.kind = kind


class InstanceTimeout(Exception):
    """The instance did not answer in time; it has been killed."""


class NotStarted(Exception):
    """A request queued behind another was lost with its instance before the instance began it:
    it did not run, so it may run elsewhere."""


class _Call:
    """One request on a channel: answered in order; its timeout runs from when the instance begins it."""

    __slots__ = ("future", "timeout_s", "on_start", "timer", "started")

    def __init__(self, future: asyncio.Future[Any], timeout_s: float | None, on_start: Callable[[], None] | None):
        self.future, self.timeout_s, self.on_start = future, timeout_s, on_start
        self.timer: asyncio.TimerHandle | None = None
        self.started = False


class Channel(asyncio.Protocol):
    """The agent's end of an instance's socketpair: requests out, their answers back in order.

    A protocol rather than a stream reader: an answer that arrives in one piece (nearly all do) is
    decoded straight from the bytes the loop read and resolves its request, with no reader task,
    no ``readexactly`` per part and no ``wait_for`` task per request. The instance serves frames
    one after the other, so a request may be queued behind the one it is running (see
    :meth:`Instance.request_after`): it begins the moment the previous answer is written, without
    waiting for the agent to read that answer and send the next.
    """

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._calls: deque[_Call] = deque()
        self._frames: deque[Any] = deque()
        """Frames no request waited for (the hello)."""
        self._waiter: asyncio.Future[Any] | None = None
        self._closed: ChannelClosed | None = None

    @property
    def closed(self) -> bool:
        """Nothing more can begin on it (the instance went, or is being killed)."""
        return self._closed is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self._buffer and len(data) >= HEADER.size:
            (size,) = HEADER.unpack_from(data)
            if len(data) == HEADER.size + size and size <= MAX_FRAME:
                self._deliver(data, HEADER.size)  # the common case: exactly one whole frame
                return
        buffer = self._buffer
        buffer += data
        while len(buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer)
            if size > MAX_FRAME:
                self._close(ChannelClosed(f"frame of {size} bytes is over the limit"))
                return
            end = HEADER.size + size
            if len(buffer) < end:
                return
            frame = bytes(buffer[:end])
            del buffer[:end]
            if not self._deliver(frame, HEADER.size):
                return

    def _deliver(self, data: bytes, start: int) -> bool:
        if self._closed is not None:
            return False
        try:
            frame = decode_body(memoryview(data)[start:])
        except ChannelClosed as exc:
            self._close(exc)
            return False
        if self._calls:
            call = self._calls.popleft()
            if call.timer is not None:
                call.timer.cancel()
            if not call.future.done():
                call.future.set_result(frame)
            if self._calls:
                self._begin(self._calls[0])
            return True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._waiter = None
            waiter.set_result(frame)
        else:
            self._frames.append(frame)
        return True

    def _begin(self, call: _Call) -> None:
        call.started = True
        if call.timeout_s is not None:
            call.timer = asyncio.get_running_loop().call_later(call.timeout_s, self._expire, call)
        if call.on_start is not None:
            call.on_start()

    def _expire(self, call: _Call) -> None:
        # The instance is killed for it: what is queued behind never began, and no later answer counts.
        if not call.future.done():
            call.future.set_exception(TimeoutError())
        self._fail_all(ChannelClosed("a request timed out; the instance is being killed"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._close(ChannelClosed("instance closed its channel"))

    def _fail_all(self, exc: ChannelClosed) -> None:
        if self._closed is None:
            self._closed = exc
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        calls, self._calls = self._calls, deque()
        for call in calls:
            if call.timer is not None:
                call.timer.cancel()
            if not call.future.done():
                call.future.set_exception(exc if call.started else NotStarted(str(exc)))

    def _close(self, exc: ChannelClosed) -> None:
        self._fail_all(exc)
        if self._transport is not None:
            self._transport.close()

    def call(
        self, frame: bytes, timeout_s: float | None, on_start: Callable[[], None] | None = None
    ) -> asyncio.Future[Any]:
        """Send one encoded request; the future gets its answer, ``TimeoutError`` once it ran
        ``timeout_s`` (counted from when the instance begins it), or the reason the channel went."""
        if self._closed is not None:
            raise NotStarted(str(self._closed))  # the instance is gone: this one never began
        assert self._transport is not None
        call = _Call(asyncio.get_running_loop().create_future(), timeout_s, on_start)
        self._calls.append(call)
        self._transport.write(frame)
        if len(self._calls) == 1:
            self._begin(call)
        return call.future

    async def receive(self) -> Any:
        """The next frame no request waits for (the hello; raises :class:`ChannelClosed` once gone)."""
        if self._frames:
            return self._frames.popleft()
        if self._closed is not None:
            raise self._closed
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            return await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def open_channel(sock: socket.socket) -> Channel:
    """Wrap the agent's end of a socketpair (non-blocking from now on) in a :class:`Channel`."""
    _transport, channel = await asyncio.get_running_loop().create_connection(Channel, sock=sock)
    return channel


@dataclass
class Instance:
    """The agent's handle on one runtime process."""

    id: str
    workdir: Path
    log_path: Path
    origin: Origin = "spawn"
    state: InstanceState = "starting"
    function: str | None = None
    function_version: str | None = None
    uses: int = 0
    created_at: float = field(default_factory=time.monotonic)
    last_used_at: float = field(default_factory=time.monotonic)
    pid: int | None = None
    cgroup: InstanceCgroup | None = None
    channel: Channel | None = None
    exited: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    """Resolves to the exit code (negative: killed by that signal) when the process ends."""
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def alive(self) -> bool:
        return self.pid is not None and not self.exited.done()

    def idle_ms(self, now: float | None = None) -> int:
        return int(((now or time.monotonic()) - self.last_used_at) * 1000)

    async def request(self, msg: Mapping[str, Any], timeout_s: float | None) -> dict[str, Any]:
        """Send one request (a :data:`services.runtime.protocol.Request`) and wait for its reply,
        checked with :func:`~services.runtime.protocol.parse_reply`; kill the instance if it takes
        too long. A malformed reply kills it too: :class:`InstanceDied`."""
        async with self._lock:
            try:
                return await self._call(msg, timeout_s, None)
            except NotStarted as exc:  # it was queued behind a request that took the instance down
                raise await self._died(exc) from exc

    async def request_after(self, msg: Mapping[str, Any], timeout_s: float, on_start: Callable[[], None]) -> Any:
        """Queue a request behind the one the instance is running: it begins as soon as that one
        is answered (``on_start`` runs then), without a round trip through the agent in between.

        Raises :class:`NotStarted` if the instance went before it began (timeout, death or kill of
        the request ahead): the request did not run. Otherwise as :meth:`request`.
        """
        return await self._call(msg, timeout_s, on_start)

    async def _call(self, msg: Mapping[str, Any], timeout_s: float | None, on_start: Callable[[], None] | None) -> Any:
        channel = self.channel
        assert channel is not None
        try:
            return parse_reply(msg["op"], await channel.call(encode_frame(msg), timeout_s, on_start))
        except ProtocolError as exc:
            await self.kill()  # what it answers next cannot be matched to a request any more
            raise InstanceDied(f"instance broke the protocol: {exc}") from exc
        except TimeoutError:
            await self.kill()
            raise InstanceTimeout(f"no answer within {timeout_s or 0:.3f}s") from None
        except NotStarted:
            raise
        except (ChannelClosed, ConnectionError, BrokenPipeError) as exc:
            raise await self._died(exc) from exc

    async def _died(self, exc: BaseException) -> InstanceDied:
        code = await self.exit_code()
        kind = "oom_killed" if self.cgroup is not None and oom_killed(self.cgroup, code) else "instance_died"
        return InstanceDied(describe_exit(code, kind), kind)

    async def exit_code(self, timeout_s: float = 2.0) -> int | None:
        try:
            return await asyncio.wait_for(asyncio.shield(self.exited), timeout_s)
        except TimeoutError:
            await self.kill()
            return self.exited.result() if self.exited.done() else None

    async def kill(self) -> None:
        """Kill every process of the instance (its cgroup, its session) and wait for the end."""
        if self.pid is not None and not self.exited.done():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        if self.cgroup is not None:
            # Catches what left the session (setsid) too; the pids limit bounds a fork race.
            with contextlib.suppress(OSError, Exception):
                await asyncio.to_thread(self.cgroup.kill_all)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.exited), 5.0)
        if self.channel is not None:
            self.channel.close()

    async def destroy(self) -> None:
        """Kill it and remove its cgroup: the normal end of an instance."""
        await self.kill()
        if self.cgroup is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.cgroup.remove)


def describe_exit(code: int | None, kind: str = "instance_died") -> str:
    if kind == "oom_killed":
        return "instance process killed by the kernel: over its memory limit"
    if code is None:
        return "instance process vanished"
    if code < 0:
        try:
            return f"instance process killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"instance process killed by signal {-code}"
    return f"instance process exited with code {code}"


@dataclass(frozen=True)
class InstanceQuarters:
    """What a new instance is given on the node before it starts: its folders, its environment
    and its confinement (made per instance by the launcher, or :func:`default_quarters`)."""

    workdir: Path
    """Its working directory (``HOME``)."""
    log_path: Path
    """Where its stdout and stderr go."""
    env: dict[str, str]
    """Its whole environment (scrubbed: none of the agent's own settings)."""
    sandbox: sandbox.SandboxSpec
    """How it is confined (rlimits, user, namespaces and root)."""
    cgroup: InstanceCgroup | None
    """Its own cgroup, when the node has cgroups."""


def instance_env(workdir: Path) -> dict[str, str]:
    """A scrubbed environment: nothing of the agent's own settings reaches user code."""
    env = {k: os.environ[k] for k in SCRUBBED_ENV_KEEP if k in os.environ}
    env["PYTHONPATH"] = str(REPO_ROOT)  # the runtime is part of this distribution
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["HOME"] = str(workdir)
    env["TMPDIR"] = str(workdir / "tmp")
    return env


async def _hello(inst: Instance, start_timeout_s: float) -> None:
    assert inst.channel is not None
    try:
        hello = await asyncio.wait_for(inst.channel.receive(), start_timeout_s)
    except (TimeoutError, ChannelClosed) as exc:
        await inst.destroy()
        raise InstanceDied(f"instance did not start: {exc!r}; see {inst.log_path}") from exc
    try:
        parse_hello(hello)
    except ProtocolError as exc:
        await inst.destroy()
        raise InstanceDied(str(exc)) from exc
    inst.state = "generic"


async def spawn_instance(
    base_dir: Path,
    python: str = sys.executable,
    start_timeout_s: float = 15.0,
    place: Callable[[str], InstanceQuarters] | None = None,
    module: str = "services.runtime",
) -> Instance:
    """Start a new interpreter as a generic instance and wait for its hello."""
    instance_id = uuid.uuid4().hex[:12]
    quarters = (place or default_quarters(base_dir))(instance_id)
    inst = Instance(
        id=instance_id, workdir=quarters.workdir, log_path=quarters.log_path, origin="spawn", cgroup=quarters.cgroup
    )
    parent_sock, child_sock = socket.socketpair()
    try:
        with quarters.log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                python,
                "-m",
                module,
                "--fd",
                str(child_sock.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(child_sock.fileno(),),
                cwd=quarters.workdir,
                env=quarters.env,
                start_new_session=True,
                preexec_fn=sandbox.make_preexec(quarters.sandbox),
            )
    except BaseException:
        parent_sock.close()
        if quarters.cgroup is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(quarters.cgroup.remove)
        raise
    finally:
        child_sock.close()
    inst.pid = process.pid

    async def reap() -> None:
        code = await process.wait()
        if not inst.exited.done():
            inst.exited.set_result(code)

    asyncio.get_running_loop().create_task(reap(), name=f"reap:{instance_id}")
    inst.channel = await open_channel(parent_sock)
    await _hello(inst, start_timeout_s)
    return inst


def default_quarters(base_dir: Path) -> Callable[[str], InstanceQuarters]:
    """No cgroup and no privilege drop: for tests of the runtime alone."""

    def place(instance_id: str) -> InstanceQuarters:
        workdir = base_dir / "instances" / instance_id
        (workdir / "tmp").mkdir(parents=True, exist_ok=True)
        log_path = base_dir / "logs" / f"{instance_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        spec = sandbox.SandboxSpec(drop_privileges=False)
        return InstanceQuarters(workdir, log_path, instance_env(workdir), spec, None)

    return place


class Zygote:
    """The agent's side of a zygote process: fork requests out, pids and exit codes back."""

    def __init__(self, python: str, preload: list[str], log_path: Path) -> None:
        self.python, self.preload, self.log_path = python, preload, log_path
        self.pid: int | None = None
        self._sock: socket.socket | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._forks: dict[str, asyncio.Future[Forked]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._early_exits: dict[int, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._process: asyncio.subprocess.Process | None = None

    @property
    def alive(self) -> bool:
        return (
            self._process is not None
            and self._process.returncode is None
            and self._task is not None
            and not self._task.done()
        )

    async def start(self, timeout_s: float = 30.0) -> None:
        parent_sock, child_sock = socket.socketpair()
        env = {k: os.environ[k] for k in SCRUBBED_ENV_KEEP if k in os.environ}
        env["PYTHONPATH"] = str(REPO_ROOT)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                self.python,
                "-m",
                "services.runtime.zygote",
                "--fd",
                str(child_sock.fileno()),
                "--preload",
                ",".join(self.preload),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(child_sock.fileno(),),
                env=env,
                start_new_session=True,
                preexec_fn=sandbox.make_preexec(sandbox.SandboxSpec(drop_privileges=False, umask=None)),
            )
        child_sock.close()
        self.pid = self._process.pid
        self._sock = parent_sock
        self._reader, self._writer = await asyncio.open_connection(sock=parent_sock)
        hello = await asyncio.wait_for(read_frame(self._reader), timeout_s)
        try:
            parse_hello(hello)
        except ProtocolError:
            raise InstanceDied(f"zygote said {hello!r}") from None
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="zygote")

    async def _follow(self) -> None:
        assert self._reader is not None
        try:
            while True:
                msg = parse_zygote_event(await read_frame(self._reader))
                if msg is None:
                    continue  # a pong: nobody waits for it
                if msg["op"] == "forked":
                    future = self._forks.pop(str(msg["id"]), None)
                    if future is not None and not future.done():
                        future.set_result(msg)
                else:
                    pid, code = msg["pid"], msg["code"]
                    waiter = self._exits.pop(pid, None)
                    if waiter is None:
                        self._early_exits[pid] = code
                    elif not waiter.done():
                        waiter.set_result(code)
        except ChannelClosed:
            pass
        finally:
            # The zygote is gone, and its children with it (parent-death signal).
            for waiter in self._exits.values():
                if not waiter.done():
                    waiter.set_result(-signal.SIGKILL)
            for future in self._forks.values():
                if not future.done():
                    future.set_exception(InstanceDied("the zygote exited"))

    async def fork(self, instance_id: str, quarters: InstanceQuarters, start_timeout_s: float = 10.0) -> Instance:
        """A new generic instance, forked from the zygote into its own sandbox."""
        sock = self._sock
        if not self.alive or sock is None:
            raise InstanceDied("no zygote")
        inst = Instance(
            id=instance_id,
            workdir=quarters.workdir,
            log_path=quarters.log_path,
            origin="zygote",
            cgroup=quarters.cgroup,
        )
        parent_sock, child_sock = socket.socketpair()
        spec = quarters.sandbox
        msg: ForkRequest = {
            "op": "fork",
            "id": instance_id,
            "workdir": str(quarters.workdir),
            "log_path": str(quarters.log_path),
            "env": quarters.env,
            "sandbox": {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.__dict__.items()},
        }
        future: asyncio.Future[Forked] = asyncio.get_running_loop().create_future()
        self._forks[instance_id] = future
        try:
            # The channel's other end travels with the request (SCM_RIGHTS); one sendmsg, one frame.
            # The socket is the event loop's (non-blocking); a full buffer only means: try again.
            frame = encode_frame(msg)
            while True:
                try:
                    sent = socket.send_fds(sock, [frame], [child_sock.fileno()])
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.001)
            if sent < len(frame):
                await asyncio.get_running_loop().sock_sendall(sock, frame[sent:])
            reply = await asyncio.wait_for(future, start_timeout_s)
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
            self._forks.pop(instance_id, None)
        if not reply.get("ok"):
            parent_sock.close()
            raise InstanceDied(f"the zygote could not fork: {reply.get('error')}")
        inst.pid = reply["pid"]
        if inst.pid in self._early_exits:
            inst.exited.set_result(self._early_exits.pop(inst.pid))
        else:
            self._exits[inst.pid] = inst.exited
        inst.channel = await open_channel(parent_sock)
        await _hello(inst, start_timeout_s)
        return inst

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            await self._process.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
