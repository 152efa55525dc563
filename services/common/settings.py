"""Settings shared by every service, loaded from an injectable environment (``STOKER_*``).

Defaults match ``stoker up``: broker on 127.0.0.1:9092, HTTP on 127.0.0.1:8080, state in ``.stoker/``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from events.topics import DEFAULT_PREFIX, Topics
from services.common.kafkasec import KafkaSecurity


def env_str(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name)
    return value if value not in (None, "") else default


def env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc


def stoker_home(env: Mapping[str, str] | None = None) -> Path:
    """The state folder: ``$STOKER_HOME`` or ``.stoker`` in the working directory."""
    env = os.environ if env is None else env
    return Path(env_str(env, "STOKER_HOME", ".stoker")).resolve()


@dataclass(frozen=True)
class CommonSettings:
    """What every Stoker process needs to find the broker and its state."""

    home: Path
    bootstrap: str = "127.0.0.1:9092"
    topic_prefix: str = DEFAULT_PREFIX
    otlp_endpoint: str = ""
    """OTLP/HTTP traces endpoint; empty writes spans to ``<home>/traces`` instead."""
    log_level: str = "INFO"
    traces_per_s: float = 100.0
    """New traces a process records per second (bursts of as many); the rest are propagated, not recorded."""
    kafka: KafkaSecurity = KafkaSecurity()
    """How to authenticate to the broker (``STOKER_KAFKA_*``; PLAINTEXT by default)."""

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def run_dir(self) -> Path:
        """Pid and readiness files of the embedded platform."""
        return self.home / "run"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def traces_dir(self) -> Path:
        return self.home / "traces"

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "artifacts"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CommonSettings:
        env = os.environ if env is None else env
        return cls(
            home=stoker_home(env),
            bootstrap=env_str(env, "STOKER_BOOTSTRAP", "127.0.0.1:9092"),
            topic_prefix=env_str(env, "STOKER_TOPIC_PREFIX", DEFAULT_PREFIX),
            otlp_endpoint=env_str(env, "STOKER_OTLP_ENDPOINT", ""),
            log_level=env_str(env, "STOKER_LOG_LEVEL", "INFO"),
            traces_per_s=env_float(env, "STOKER_TRACES_PER_S", 100.0),
            kafka=KafkaSecurity.from_env(env),
        )
