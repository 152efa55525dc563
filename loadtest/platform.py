"""A throwaway platform for a benchmark: free ports, a temporary state folder, `stoker up`/`down`.

The platform itself is :class:`services.testing.LocalPlatform`; this module keeps the benchmarks' names.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from services.common.settings import CommonSettings
from services.testing import STOKER, LocalPlatform, free_ports, shared_libs_dir

LIBS = shared_libs_dir()
"""The Kafka jar cache the benchmarks' brokers share."""

__all__ = ["LIBS", "STOKER", "free_port", "free_ports", "own_platform", "settings_of"]


def free_port() -> int:
    return free_ports(1)[0]


@contextmanager
def own_platform(extra_env: dict[str, str] | None = None, *up_args: str) -> Iterator[tuple[dict[str, str], str]]:
    """Start a platform of its own; yields (environment for `stoker`, gateway URL)."""
    with tempfile.TemporaryDirectory(prefix="stoker-bench-") as tmp:
        try:
            platform = LocalPlatform.launch(Path(tmp) / "home", "--no-example", *up_args, env_extra=extra_env)
        except AssertionError as exc:  # the benchmarks report a platform that did not start as a RuntimeError
            raise RuntimeError(str(exc)) from exc
        try:
            yield platform.env, platform.http
        finally:
            platform.stoker("down", check=False)


def settings_of(env: dict[str, str]) -> CommonSettings:
    return CommonSettings.from_env(env)
