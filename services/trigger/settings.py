"""Trigger service settings."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.common.settings import CommonSettings, env_float, env_int, env_str


@dataclass(frozen=True)
class TriggerSettings:
    common: CommonSettings
    instance_name: str = "trigger"
    """This copy's name (``STOKER_INSTANCE_NAME``): its client id and its ``trigger.status`` key."""
    max_record_bytes: int = 768 * 1024
    """An invocation built from a record may be at most this large (the broker refuses records
    over 1 MiB, and a non-JSON value grows by a third in base64); larger ones go to the error topic."""
    invocation_deadline_s: float = 300.0
    """Each invocation's deadline: past it the platform ends it (``timeout``/``rejected``), so an
    attempt never waits for ever; the trigger waits this plus a margin for the result."""
    commit_interval_s: float = 0.2
    """Recorded positions are committed at most this often."""
    status_interval_s: float = 2.0
    """How often each trigger's ``trigger.status`` (lag, counts) is published."""
    metrics_port: int = 0
    """Prometheus ``/metrics`` port (``STOKER_TRIGGER_METRICS_PORT``); 0 picks a free one (written in
    the ready file), -1 serves none."""
    metrics_host: str = "127.0.0.1"
    """Address of ``/metrics`` (``STOKER_TRIGGER_METRICS_HOST``): loopback unless a cluster's scraper must reach it."""
    lease_timeout_ms: int = 6000
    """Cron scheduling is one active copy: how long a dead one holds the lease."""
    cron_tick_s: float = 1.0
    """How often the active copy looks for due slots."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TriggerSettings:
        env = os.environ if env is None else env
        return cls(
            common=CommonSettings.from_env(env),
            instance_name=env.get("STOKER_INSTANCE_NAME") or "trigger",
            max_record_bytes=env_int(env, "STOKER_TRIGGER_MAX_RECORD_BYTES", 768 * 1024),
            invocation_deadline_s=env_float(env, "STOKER_TRIGGER_DEADLINE_S", 300.0),
            metrics_port=env_int(env, "STOKER_TRIGGER_METRICS_PORT", 0),
            metrics_host=env_str(env, "STOKER_TRIGGER_METRICS_HOST", "127.0.0.1"),
            lease_timeout_ms=env_int(env, "STOKER_LEASE_TIMEOUT_MS", 6000),
        )
