"""Pool manager settings."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.common.leadership import instance_name
from services.common.settings import CommonSettings, env_float, env_int, env_str
from services.poolmgr.keepalive import policy_from_config
from services.poolmgr.policy import PoolPolicy


def pool_policy_from_env(env: Mapping[str, str]) -> PoolPolicy:
    """The pool policy configured by ``STOKER_POOL_SIZE``, ``STOKER_KEEPALIVE`` and ``STOKER_KEEPALIVE_FIXED_S``.

    ``STOKER_KEEPALIVE``: ``hybrid`` (default, learned per function) or ``fixed`` (every function
    keeps its idle instances ``STOKER_KEEPALIVE_FIXED_S`` seconds, 600 by default).
    ``STOKER_KEEPALIVE_TIME_SCALE`` (1 by default) divides the hybrid policy's time constants: a
    trace replay on a clock that many times faster (``loadtest trace``). A function that
    sets ``idle_s`` keeps that fixed value either way.
    """
    keepalive = policy_from_config(
        env_str(env, "STOKER_KEEPALIVE", "hybrid"),
        env_float(env, "STOKER_KEEPALIVE_FIXED_S", 600.0),
        env_float(env, "STOKER_KEEPALIVE_TIME_SCALE", 1.0),
    )
    return PoolPolicy(generic_per_node=env_int(env, "STOKER_POOL_SIZE", 2), keepalive=keepalive)


@dataclass(frozen=True)
class PoolmgrSettings:
    common: CommonSettings
    policy: PoolPolicy = field(default_factory=PoolPolicy)
    prewarm_timeout_s: float = 20.0
    """How long a new version waits for its prewarm before it goes live anyway."""
    keepalive_tick_s: float = 1.0
    instance_name: str = "poolmgr"
    """This copy's name (``STOKER_INSTANCE_NAME``; else host and pid): client ids, lease claims."""
    component: str = "poolmgr"
    """The name of its pid, log and ready files: ``STOKER_INSTANCE_NAME``, else ``poolmgr``."""
    lease_timeout_ms: int = 6_000
    """A dead active copy is replaced after this (``STOKER_LEASE_TIMEOUT_MS``; the broker's
    ``group.min.session.timeout.ms``, 6 s by default, is the least it accepts)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PoolmgrSettings:
        env = os.environ if env is None else env
        return cls(
            common=CommonSettings.from_env(env),
            policy=pool_policy_from_env(env),
            prewarm_timeout_s=env_float(env, "STOKER_PREWARM_TIMEOUT_S", 20.0),
            instance_name=instance_name(env, "poolmgr"),
            component=env.get("STOKER_INSTANCE_NAME") or "poolmgr",
            lease_timeout_ms=env_int(env, "STOKER_LEASE_TIMEOUT_MS", 6_000),
        )
