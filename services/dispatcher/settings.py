"""Dispatcher settings."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.common.settings import CommonSettings, env_float, env_int


@dataclass(frozen=True)
class DispatcherSettings:
    common: CommonSettings
    node_timeout_s: float = 6.0
    """A node whose last heartbeat is older than this is down; its work is retried or lost."""
    max_attempts: int = 2
    """Runs of one invocation at most (the first plus retries after a node died)."""
    max_queue_s: float = 60.0
    """How long an invocation without a deadline may wait for capacity before it is rejected."""
    tick_s: float = 0.25
    """How often queues and node liveness are checked while anything waits or runs (else every second)."""
    record_after_s: float = 0.2
    """Work still running this long after its Execute gets a ``dispatch.sent`` record (checked every
    tick); until then its offset waits for its result, and a crash leaves it for the next owner to
    find in the work topics. 0 records every Execute at once."""
    commit_interval_s: float = 0.1
    """Confirmed positions are committed at most this often (a crash re-reads at most this much,
    and the ``dispatch`` records tell which of those re-read records were already handed on)."""
    instance_name: str = "dispatcher"
    """This copy's name (``STOKER_INSTANCE_NAME``): its client id in the consumer group."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DispatcherSettings:
        env = os.environ if env is None else env
        return cls(
            common=CommonSettings.from_env(env),
            node_timeout_s=env_float(env, "STOKER_NODE_TIMEOUT_S", 6.0),
            max_attempts=env_int(env, "STOKER_MAX_ATTEMPTS", 2),
            max_queue_s=env_float(env, "STOKER_MAX_QUEUE_S", 60.0),
            record_after_s=env_float(env, "STOKER_RECORD_AFTER_S", 0.2),
            instance_name=env.get("STOKER_INSTANCE_NAME") or "dispatcher",
        )
