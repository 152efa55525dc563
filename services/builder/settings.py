"""Builder settings."""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.common.settings import CommonSettings, env_float, env_str


@dataclass(frozen=True)
class BuilderSettings:
    common: CommonSettings
    pip_args: list[str] = field(default_factory=list)
    """Extra ``pip install`` arguments, e.g. ``--index-url …`` or ``--no-index --find-links DIR``."""
    pip_timeout_s: float = 600.0

    @property
    def work_dir(self) -> Path:
        return self.common.home / "builder"

    @property
    def repo_cache(self) -> Path:
        """Bare mirrors of the repositories, so a build fetches only what is new."""
        return self.work_dir / "repos"

    @property
    def wheel_cache(self) -> Path:
        """pip's cache, shared by every build."""
        return self.work_dir / "pip-cache"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BuilderSettings:
        env = os.environ if env is None else env
        return cls(
            common=CommonSettings.from_env(env),
            pip_args=shlex.split(env_str(env, "STOKER_PIP_ARGS", "")),
            pip_timeout_s=env_float(env, "STOKER_PIP_TIMEOUT_S", 600.0),
        )
