"""nodewatch settings (``STOKER_NODEWATCH_*``, ``STOKER_MAX_INSTANCES``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.common.settings import CommonSettings, env_float, env_int, env_str

DEFAULT_SELECTOR = "stoker.io/role in (runtime,isolated)"


@dataclass(frozen=True)
class NodewatchSettings:
    common: CommonSettings
    label_selector: str = DEFAULT_SELECTOR
    """Which Nodes to follow (a Kubernetes label selector; empty: all)."""
    taint_topic: str = "stoker.node-taint"
    """Compacted topic of taint requests, key = node."""
    default_max_instances: int = 8
    """``capacity.max_instances`` of a node without a ``stoker.io/max-instances`` annotation."""
    watch_timeout_s: int = 300
    """Each watch request's server-side timeout; the watch then resumes where it was."""
    retry_s: float = 30.0
    """How often taints that could not be applied are tried again."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NodewatchSettings:
        env = os.environ if env is None else env
        common = CommonSettings.from_env(env)
        return cls(
            common=common,
            # An explicitly empty selector means every node, so it is not replaced by the default.
            label_selector=env.get("STOKER_NODEWATCH_SELECTOR", DEFAULT_SELECTOR).strip(),
            taint_topic=env_str(env, "STOKER_NODEWATCH_TAINT_TOPIC", f"{common.topic_prefix}node-taint"),
            default_max_instances=env_int(env, "STOKER_MAX_INSTANCES", 8),
            watch_timeout_s=env_int(env, "STOKER_NODEWATCH_WATCH_TIMEOUT_S", 300),
            retry_s=env_float(env, "STOKER_NODEWATCH_RETRY_S", 30.0),
        )
