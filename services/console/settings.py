"""Console settings."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.common.settings import CommonSettings, env_float, env_int, env_str


@dataclass(frozen=True)
class ConsoleSettings:
    common: CommonSettings
    host: str = "127.0.0.1"
    port: int = 8081
    idle_after_s: float = 120.0
    """With no page open for this long the console stops reading the topics: a console nobody looks
    at costs the broker nothing."""
    login_failures_per_s: float = 5.0
    """Unknown tokens a second one client address may try before it is answered 429."""
    history_s: float = 300.0
    """How far back the results are read when the console starts looking (the figures' window)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ConsoleSettings:
        env = os.environ if env is None else env
        return cls(
            common=CommonSettings.from_env(env),
            host=env_str(env, "STOKER_CONSOLE_HOST", "127.0.0.1"),
            port=env_int(env, "STOKER_CONSOLE_PORT", 8081),
            idle_after_s=env_float(env, "STOKER_CONSOLE_IDLE_S", 120.0),
            history_s=env_float(env, "STOKER_CONSOLE_HISTORY_S", 300.0),
            login_failures_per_s=env_float(env, "STOKER_AUTH_FAILURES_PER_S", 5.0),
        )
