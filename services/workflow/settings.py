"""Workflow engine settings."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.common.leadership import instance_name
from services.common.settings import CommonSettings, env_int


@dataclass(frozen=True)
class WorkflowSettings:
    common: CommonSettings
    instance_name: str = "workflow"
    """This copy's name (``STOKER_INSTANCE_NAME``; else host and pid): client ids, lease claims."""
    component: str = "workflow"
    """The name of its pid, log and ready files: ``STOKER_INSTANCE_NAME``, else ``workflow``."""
    lease_timeout_ms: int = 6_000
    """A dead active copy is replaced after this (``STOKER_LEASE_TIMEOUT_MS``; the broker's
    ``group.min.session.timeout.ms``, 6 s by default, is the least it accepts)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkflowSettings:
        env = os.environ if env is None else env
        return cls(
            common=CommonSettings.from_env(env),
            instance_name=instance_name(env, "workflow"),
            component=env.get("STOKER_INSTANCE_NAME") or "workflow",
            lease_timeout_ms=env_int(env, "STOKER_LEASE_TIMEOUT_MS", 6_000),
        )
