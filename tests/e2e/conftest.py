"""The whole platform, started the way a user starts it: `stoker up --detach`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from services.common.settings import CommonSettings
from tests.helpers import free_ports, shared_libs_dir

STOKER = str(Path(sys.executable).parent / "stoker")


@dataclass
class Platform:
    home: Path
    env: dict[str, str]
    http: str

    @property
    def settings(self) -> CommonSettings:
        return CommonSettings.from_env(self.env)

    def stoker(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([STOKER, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"stoker {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def status(self) -> dict:  # type: ignore[type-arg]
        return orjson.loads(self.stoker("status", "--json").stdout)  # type: ignore[no-any-return]

    def pids(self) -> dict[str, int]:
        run = self.home / "run"
        return {p.stem: int(p.read_text()) for p in run.glob("*.pid")} if run.is_dir() else {}

    @property
    def admin_token(self) -> str:
        """The first admin token, as `stoker up` left it in the state folder."""
        return (self.home / "admin-token").read_text().strip()

    def client(self, token: str | None = None) -> httpx.Client:
        """An HTTP client of the gateway with ``token`` (the admin token unless given; "" for none)."""
        token = self.admin_token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.http, timeout=60, headers=headers)


def processes_under(home: Path) -> list[int]:
    """Pids of live processes whose working directory or command line is inside ``home``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().split()[2]
        except OSError:
            continue
        if state != "Z" and (cwd.startswith(str(home)) or str(home) in cmdline):
            found.append(int(proc.name))
    return found


def start_platform(home: Path, *extra: str, env_extra: dict[str, str] | None = None) -> tuple[Platform, str]:
    kafka_port, controller_port, http_port, console_port = free_ports(4)
    env = {
        **os.environ,
        "STOKER_HOME": str(home),
        "STOKER_BOOTSTRAP": f"127.0.0.1:{kafka_port}",
        "STOKER_CONTROLLER_PORT": str(controller_port),
        "STOKER_HTTP_PORT": str(http_port),
        "STOKER_CONSOLE_PORT": str(console_port),
        "STOKER_KAFKA_LIBS": str(shared_libs_dir()),
        **(env_extra or {}),
    }
    platform = Platform(home, env, f"http://127.0.0.1:{http_port}")
    up = platform.stoker("up", "--detach", *extra, check=False, timeout=180)
    if up.returncode != 0:
        platform.stoker("down", check=False)
        raise AssertionError(f"stoker up failed:\n{up.stdout}\n{up.stderr}")
    return platform, up.stdout


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    home = tmp_path_factory.mktemp("stoker-home")
    running, up_output = start_platform(home, env_extra={"STOKER_PUBLISH_TIMEOUT_S": "3"})
    running.up_output = up_output  # type: ignore[attr-defined]
    try:
        yield running
    finally:
        running.stoker("down", check=False)
        # `stoker down` leaves no process behind: services, agents, instances and the broker.
        deadline = time.monotonic() + 10
        while processes_under(home) and time.monotonic() < deadline:
            time.sleep(0.1)
        leftovers = processes_under(home)
        assert not leftovers, f"processes left after `stoker down`: {leftovers}"
