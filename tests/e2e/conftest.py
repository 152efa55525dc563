"""The whole platform, started the way a user starts it: `stoker up --detach`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.testing import STOKER, LocalPlatform, processes_under

__all__ = ["STOKER", "Platform", "processes_under", "start_platform"]

Platform = LocalPlatform
"""The tests' name for the packaged throwaway platform."""


def start_platform(home: Path, *extra: str, env_extra: dict[str, str] | None = None) -> tuple[Platform, str]:
    platform = LocalPlatform.launch(home, *extra, env_extra=env_extra)
    return platform, platform.up_output


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    home = tmp_path_factory.mktemp("stoker-home")
    running, up_output = start_platform(home, env_extra={"STOKER_PUBLISH_TIMEOUT_S": "3"})
    running.up_output = up_output
    try:
        yield running
    finally:
        # `stoker down` leaves no process behind: services, agents, instances and the broker.
        running.stop()
