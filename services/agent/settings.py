"""Node agent settings (``STOKER_NODE_*``, ``STOKER_POOL_SIZE``, ...)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from events.node import Taint
from services.common.settings import CommonSettings, env_float, env_int, env_str


def parse_labels(raw: str) -> dict[str, str]:
    """``a=b,c=d`` -> {"a": "b", "c": "d"}."""
    labels: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"label {part!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


def parse_taints(raw: str) -> list[Taint]:
    """``key=value:Effect,key2:Effect`` -> taints."""
    taints = []
    for part in filter(None, (p.strip() for p in raw.split(","))):
        kv, sep, effect = part.rpartition(":")
        if not sep:
            raise ValueError(f"taint {part!r} is not key[=value]:Effect")
        key, _, value = kv.partition("=")
        if not key.strip():
            raise ValueError(f"taint {part!r} has no key")
        taints.append(Taint(key=key, value=value, effect=effect))  # type: ignore[arg-type]
    return taints


def _total_memory_mb() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 4096


DEFAULT_PRELOAD = (
    "asyncio",
    "json",
    "decimal",
    "datetime",
    "email.message",
    "uuid",
    "hashlib",
    "logging",
    "urllib.parse",
    "base64",
    "re",
    "typing",
    "dataclasses",
    "collections",
)
"""Imported once in the zygote, so instances fork with them loaded."""


@dataclass(frozen=True)
class AgentSettings:
    common: CommonSettings
    node: str = "runtime-0"
    pool_size: int = 2
    """Generic instances kept ready until the poolmgr says otherwise."""
    max_instances: int = 8
    heartbeat_interval_s: float = 2.0
    """Every heartbeat says the node is up; three missed (``STOKER_NODE_TIMEOUT_S``, 6 s) and it is down.
    Every service that routes or places reads each one, so this is the idle platform's main pulse."""
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[Taint] = field(default_factory=list)
    python: str = sys.executable
    drain_timeout_s: float = 10.0
    metric_interval_s: float = 1.0
    cpu_millis: int = field(default_factory=lambda: (os.cpu_count() or 1) * 1000)
    memory_mb: int = field(default_factory=lambda: _total_memory_mb())
    zygote: bool = True
    """Fork new instances from a zygote with the runtime pre-imported (else spawn interpreters)."""
    zygote_preload: list[str] = field(default_factory=lambda: list(DEFAULT_PRELOAD))
    cgroups: str = "auto"
    """``auto``: a cgroup per instance when the host allows it; ``on``: required; ``off``."""
    instance_uids: str = "200000-201023"
    """Uids (and gids) given to instances, one per instance at a time, when the agent is root."""
    egress_deny: str = ""
    """Comma-separated CIDRs egress instances may not reach, beyond the private, loopback and
    link-local ranges and the broker's addresses (the platform's other addresses, if public)."""

    @property
    def node_dir(self) -> Path:
        """This node's local state: code cache, instance working dirs and logs."""
        return self.common.home / "nodes" / self.node

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AgentSettings:
        env = os.environ if env is None else env
        node = env_str(env, "STOKER_NODE_NAME", "runtime-0")
        return cls(
            common=CommonSettings.from_env(env),
            node=node,
            pool_size=env_int(env, "STOKER_POOL_SIZE", 2),
            max_instances=env_int(env, "STOKER_MAX_INSTANCES", 8),
            heartbeat_interval_s=env_float(env, "STOKER_HEARTBEAT_S", 2.0),
            labels={
                "stoker.io/role": "runtime",
                "kubernetes.io/hostname": node,
                **parse_labels(env_str(env, "STOKER_NODE_LABELS", "")),
            },
            taints=parse_taints(env_str(env, "STOKER_NODE_TAINTS", "")),
            python=env_str(env, "STOKER_RUNTIME_PYTHON", sys.executable),
            drain_timeout_s=env_float(env, "STOKER_DRAIN_TIMEOUT_S", 10.0),
            zygote=env_str(env, "STOKER_ZYGOTE", "on") != "off",
            metric_interval_s=env_float(env, "STOKER_METRIC_INTERVAL_S", 1.0),
            cpu_millis=env_int(env, "STOKER_NODE_CPU_MILLIS", (os.cpu_count() or 1) * 1000),
            memory_mb=env_int(env, "STOKER_NODE_MEMORY_MB", _total_memory_mb()),
            zygote_preload=[
                m for m in env_str(env, "STOKER_ZYGOTE_PRELOAD", ",".join(DEFAULT_PRELOAD)).split(",") if m
            ],
            cgroups=env_str(env, "STOKER_CGROUPS", "auto"),
            instance_uids=env_str(env, "STOKER_INSTANCE_UIDS", "200000-201023"),
            egress_deny=env_str(env, "STOKER_EGRESS_DENY", ""),
        )
