"""Shared test helpers: free ports, waiting on conditions, a real broker."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from services.common.runner import ready_file
from services.testing import RunningBroker, free_ports, shared_libs_dir, start_broker

REPO_ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")
__all__ = [
    "REPO_ROOT",
    "RunningBroker",
    "ServiceProcess",
    "assert_eventually",
    "eventually",
    "free_ports",
    "own_trace",
    "shared_libs_dir",
    "start_test_broker",
]


def assert_eventually(
    check: Callable[[], T], timeout_s: float = 20.0, interval_s: float = 0.05, message: str = ""
) -> T:
    """Retry ``check`` until it returns a truthy value (or stops raising AssertionError)."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            value = check()
            if value:
                return value
            last = value
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout_s}s: {message} (last: {last!r})")
        time.sleep(interval_s)


async def eventually(
    check: Callable[[], Awaitable[T]], timeout_s: float = 20.0, interval_s: float = 0.05, message: str = ""
) -> T:
    """Async ``assert_eventually``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            value = await check()
            if value:
                return value
            last = value
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout_s}s: {message} (last: {last!r})")
        await asyncio.sleep(interval_s)


def own_trace(out: str) -> tuple[str, int]:
    """The requested trace of ``stoker trace`` output and how many trace trees it holds.

    A span that started on a prewarmed instance links to the prewarm's trace, which the command prints after
    the requested one; that linked tree is not part of the invocation's own trace.
    """
    own = out.split("linked from")[0]
    return own, sum(line.startswith("trace ") for line in own.splitlines())


def start_test_broker(home: Path) -> RunningBroker:
    """Start a real single-node KRaft broker on free ports; fails loudly with its log."""
    return start_broker(home, timeout_s=90)


class ServiceProcess:
    """A Stoker service run as its own process, the way `stoker up` runs it."""

    def __init__(self, module: str, component: str, settings: Any, extra_env: dict[str, str] | None = None) -> None:
        import subprocess
        import sys

        self.component = component
        self.settings = settings
        settings.logs_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = settings.logs_dir / f"{component}.log"
        env = {
            **os.environ,
            "STOKER_HOME": str(settings.home),
            "STOKER_BOOTSTRAP": settings.bootstrap,
            "STOKER_TOPIC_PREFIX": settings.topic_prefix,
            **(extra_env or {}),
        }
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module], stdout=log, stderr=log, env=env, start_new_session=True
            )

    @property
    def ready_file(self) -> Path:
        return ready_file(self.settings, self.component)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout_s: float = 30.0) -> dict[str, Any]:
        import orjson

        deadline = time.monotonic() + timeout_s
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.component} exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.component} not ready in {timeout_s}s:\n{self.log()}")
            time.sleep(0.05)
        return orjson.loads(self.ready_file.read_bytes())  # type: ignore[no-any-return]

    def stop(self, timeout_s: float = 20.0) -> int:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except Exception:  # noqa: BLE001
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        import signal

        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
