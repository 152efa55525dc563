"""A throwaway platform for a benchmark: free ports, a temporary state folder, `stoker up`/`down`."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from services.common.settings import CommonSettings

STOKER = str(Path(sys.executable).parent / "stoker")
LIBS = Path(__file__).resolve().parents[1] / ".stoker" / "kafka" / "libs"


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


def free_port() -> int:
    return free_ports(1)[0]


@contextmanager
def own_platform(extra_env: dict[str, str] | None = None, *up_args: str) -> Iterator[tuple[dict[str, str], str]]:
    """Start a platform of its own; yields (environment for `stoker`, gateway URL)."""
    with tempfile.TemporaryDirectory(prefix="stoker-bench-") as tmp:
        kafka, controller, http, console = free_port(), free_port(), free_port(), free_port()
        env = {
            **os.environ,
            "STOKER_HOME": str(Path(tmp) / "home"),
            "STOKER_BOOTSTRAP": f"127.0.0.1:{kafka}",
            "STOKER_CONTROLLER_PORT": str(controller),
            "STOKER_HTTP_PORT": str(http),
            "STOKER_CONSOLE_PORT": str(console),
            "STOKER_KAFKA_LIBS": os.environ.get("STOKER_KAFKA_LIBS", str(LIBS)),
            **(extra_env or {}),
        }
        up = subprocess.run(
            [STOKER, "up", "--detach", "--no-example", *up_args], env=env, capture_output=True, text=True
        )
        if up.returncode != 0:
            subprocess.run([STOKER, "down"], env=env, capture_output=True)
            raise RuntimeError(f"stoker up failed:\n{up.stdout}\n{up.stderr}")
        try:
            yield env, f"http://127.0.0.1:{http}"
        finally:
            subprocess.run([STOKER, "down"], env=env, capture_output=True)


def settings_of(env: dict[str, str]) -> CommonSettings:
    return CommonSettings.from_env(env)
