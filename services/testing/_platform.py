"""The implementation behind ``services.testing``."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from services.cli import broker as kafka
from services.common.settings import CommonSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
STOKER = str(Path(sys.executable).parent / "stoker")
"""The ``stoker`` command of the running interpreter's environment."""


def shared_libs_dir() -> Path:
    """The Kafka jar cache every throwaway broker shares (``STOKER_KAFKA_LIBS``, else the repository's)."""
    env = os.environ.get("STOKER_KAFKA_LIBS")
    return Path(env) if env else REPO_ROOT / ".stoker" / "kafka" / "libs"


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports, below the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` is in the ephemeral range, which every outgoing connection
    draws from too: a platform's services open dozens of connections to Kafka while it starts, and one of
    them can take a listener's port before the listener binds it. Ports below the range are not used that way.
    """
    low = _ephemeral_low()
    found: list[int] = []
    rng = random.Random()
    while len(found) < n:
        port = rng.randrange(10_000, low)
        if port in found:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
    return found


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@dataclass
class RunningBroker:
    """An embedded broker started by :func:`start_broker`; stop it with :meth:`stop`."""

    cfg: kafka.BrokerConfig
    proc: Any

    @property
    def bootstrap(self) -> str:
        return self.cfg.bootstrap

    def stop(self, timeout_s: float = 30.0) -> None:
        kafka.stop_broker(self.proc, timeout_s=timeout_s)


def start_broker(home: Path, timeout_s: float = 90.0) -> RunningBroker:
    """Start a real single-node KRaft broker in ``home`` on free ports; raises ``BrokerError`` with its log."""
    port, controller = free_ports(2)
    libs = kafka.fetch_artifacts(home, REPO_ROOT, shared_libs_dir())
    cfg = kafka.BrokerConfig(home=home, port=port, controller_port=controller, libs_dir=libs)
    return RunningBroker(cfg, kafka.launch(cfg, REPO_ROOT, timeout_s=timeout_s))


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


@dataclass
class LocalPlatform:
    """A platform of its own, run from ``home`` with ``env``; its gateway is at ``http``."""

    home: Path
    env: dict[str, str]
    http: str
    up_output: str = ""
    """What ``stoker up`` printed."""

    @classmethod
    def launch(
        cls, home: Path, *up_args: str, env_extra: dict[str, str] | None = None, bootstrap: str | None = None
    ) -> LocalPlatform:
        """Run ``stoker up --detach *up_args`` from ``home`` on free ports; raises with its output if it fails.

        ``bootstrap`` uses a broker that already runs rather than an embedded one.
        """
        kafka_port, controller_port, http_port, console_port = free_ports(4)
        env = {
            **os.environ,
            "STOKER_HOME": str(home),
            "STOKER_BOOTSTRAP": bootstrap or f"127.0.0.1:{kafka_port}",
            "STOKER_CONTROLLER_PORT": str(controller_port),
            "STOKER_HTTP_PORT": str(http_port),
            "STOKER_CONSOLE_PORT": str(console_port),
            "STOKER_KAFKA_LIBS": str(shared_libs_dir()),
            **(env_extra or {}),
        }
        extra = ("--bootstrap", bootstrap) if bootstrap else ()
        platform = cls(home, env, f"http://127.0.0.1:{http_port}")
        up = platform.stoker("up", "--detach", *extra, *up_args, check=False, timeout=180)
        if up.returncode != 0:
            platform.stoker("down", check=False)
            raise AssertionError(f"stoker up failed:\n{up.stdout}\n{up.stderr}")
        platform.up_output = up.stdout
        return platform

    @classmethod
    @contextmanager
    def start(
        cls, *up_args: str, env_extra: dict[str, str] | None = None, bootstrap: str | None = None
    ) -> Iterator[LocalPlatform]:
        """A platform in a temporary folder for the ``with`` block; stopped (nothing left running) after it."""
        with tempfile.TemporaryDirectory(prefix="stoker-") as tmp:
            platform = cls.launch(Path(tmp) / "home", *up_args, env_extra=env_extra, bootstrap=bootstrap)
            try:
                yield platform
            finally:
                platform.stop()

    def stop(self, timeout_s: float = 10.0) -> None:
        """``stoker down``, then wait until no process runs from the state folder; raises if one is left."""
        self.stoker("down", check=False)
        deadline = time.monotonic() + timeout_s
        while processes_under(self.home) and time.monotonic() < deadline:
            time.sleep(0.1)
        leftovers = processes_under(self.home)
        assert not leftovers, f"processes left after `stoker down`: {leftovers}"

    @property
    def settings(self) -> CommonSettings:
        return CommonSettings.from_env(self.env)

    @property
    def bootstrap(self) -> str:
        return self.env["STOKER_BOOTSTRAP"]

    @property
    def gateway_url(self) -> str:
        return self.http

    def stoker(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a ``stoker`` command against this platform; raises with its output if ``check`` and it fails."""
        command = [STOKER] if shutil.which(STOKER) else [sys.executable, "-m", "services.cli.main"]
        proc = subprocess.run([*command, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"stoker {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def status(self) -> dict[str, Any]:
        """``stoker status --json``."""
        return orjson.loads(self.stoker("status", "--json").stdout)  # type: ignore[no-any-return]

    def pids(self) -> dict[str, int]:
        run = self.home / "run"
        return {p.stem: int(p.read_text()) for p in run.glob("*.pid")} if run.is_dir() else {}

    @property
    def admin_token(self) -> str:
        """The first admin token, as `stoker up` left it in the state folder."""
        return (self.home / "admin-token").read_text().strip()

    def client(self, token: str | None = None) -> Any:
        """An ``httpx.Client`` of the gateway with ``token`` (the admin token unless given; "" for none)."""
        import httpx  # a test dependency, not the platform's

        token = self.admin_token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.http, timeout=60, headers=headers)
