"""One runtime instance: a child process the agent talks to over a socketpair.

Each instance runs in its own session (so its whole process tree can be killed at once),
with a scrubbed environment and its own working directory; what it prints goes to its log file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from events.instance import InstanceState
from services.runtime.protocol import ChannelClosed, encode_frame, read_frame

SCRUBBED_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONHASHSEED")
PR_SET_PDEATHSIG = 1


def _die_with_agent() -> None:
    """In the child, before exec: get SIGKILL when the agent dies, so no instance outlives it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not Linux: the channel closing still ends an idle instance


class InstanceDied(Exception):
    """The instance's process went away while it was being used."""


class InstanceTimeout(Exception):
    """The instance did not answer in time; it has been killed."""


@dataclass
class Instance:
    """The agent's handle on one runtime process."""

    id: str
    workdir: Path
    log_path: Path
    state: InstanceState = "starting"
    function: str | None = None
    function_version: str | None = None
    uses: int = 0
    created_at: float = field(default_factory=time.monotonic)
    last_used_at: float = field(default_factory=time.monotonic)
    pid: int | None = None
    process: asyncio.subprocess.Process | None = None
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def idle_ms(self, now: float | None = None) -> int:
        return int(((now or time.monotonic()) - self.last_used_at) * 1000)

    async def request(self, msg: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
        """Send one frame and wait for its answer; kill the instance if it takes too long."""
        assert self.writer is not None and self.reader is not None
        async with self._lock:
            try:
                self.writer.write(encode_frame(msg))
                await self.writer.drain()
                return await asyncio.wait_for(read_frame(self.reader), timeout_s)  # type: ignore[no-any-return]
            except TimeoutError:
                await self.kill()
                raise InstanceTimeout(f"no answer within {timeout_s:.3f}s") from None
            except (ChannelClosed, ConnectionError, BrokenPipeError) as exc:
                code = await self._exit_code()
                raise InstanceDied(_describe_exit(code)) from exc

    async def _exit_code(self) -> int | None:
        if self.process is None:
            return None
        try:
            return await asyncio.wait_for(self.process.wait(), 2.0)
        except TimeoutError:
            await self.kill()
            return self.process.returncode

    async def kill(self) -> None:
        """Kill the instance's whole process group and reap it."""
        if self.process is None:
            return
        if self.process.returncode is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await self.process.wait()
        if self.writer is not None:
            self.writer.close()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "instance process vanished"
    if code < 0:
        try:
            return f"instance process killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"instance process killed by signal {-code}"
    return f"instance process exited with code {code}"


async def spawn_instance(base_dir: Path, python: str = sys.executable, start_timeout_s: float = 15.0) -> Instance:
    """Start a new generic instance and wait for its hello."""
    instance_id = uuid.uuid4().hex[:12]
    workdir = base_dir / "instances" / instance_id
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = base_dir / "logs" / f"{instance_id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    inst = Instance(id=instance_id, workdir=workdir, log_path=log_path)
    parent_sock, child_sock = socket.socketpair()
    env = {k: os.environ[k] for k in SCRUBBED_ENV_KEEP if k in os.environ}
    # The runtime is part of this distribution: let the child import it wherever it is installed.
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    with log_path.open("ab") as log:
        inst.process = await asyncio.create_subprocess_exec(
            python,
            "-m",
            "services.runtime",
            "--fd",
            str(child_sock.fileno()),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(child_sock.fileno(),),
            cwd=workdir,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_agent,
        )
    child_sock.close()
    inst.pid = inst.process.pid
    inst.reader, inst.writer = await asyncio.open_connection(sock=parent_sock)
    try:
        hello = await asyncio.wait_for(read_frame(inst.reader), start_timeout_s)
    except (TimeoutError, ChannelClosed) as exc:
        await inst.kill()
        raise InstanceDied(f"instance did not start: {exc!r}; see {log_path}") from exc
    if hello.get("op") != "hello":
        await inst.kill()
        raise InstanceDied(f"unexpected greeting {hello!r}")
    inst.state = "generic"
    return inst
