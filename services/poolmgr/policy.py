"""Pure pool policy: generic pool size per node, and which idle instances keep-alive ends.

(The learned hybrid-histogram keep-alive of "Serverless in the Wild" replaces the fixed
per-function ``idle_s`` here in a later issue; the interface stays: heartbeat in, commands out.)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from events import FunctionSpec, NodeHeartbeat


@dataclass(frozen=True)
class PoolPolicy:
    generic_per_node: int = 2
    """Generic instances each runtime node keeps ready."""
    default_idle_s: float = 600.0
    """Keep-alive of functions that set no ``idle_s`` (until a learned policy decides)."""


def generic_target(node: NodeHeartbeat, policy: PoolPolicy) -> int:
    """How many generic instances ``node`` should keep: the policy's number, within capacity."""
    return max(0, min(policy.generic_per_node, node.capacity.max_instances))


@dataclass(frozen=True)
class RecycleDecision:
    instance: str
    function: str | None
    reason: str


def keepalive_expired(
    node: NodeHeartbeat,
    specs: Mapping[str, FunctionSpec],
    policy: PoolPolicy,
    protected: Collection[tuple[str, str]] = (),
) -> list[RecycleDecision]:
    """Idle specialized instances past their function's keep-alive (or of a deleted function).

    ``protected`` (function, version) pairs are being prewarmed or were just activated: their
    instances hold a version that is not (yet, as far as this view knows) the active one, and
    must not be mistaken for stale ones.
    """
    decisions = []
    for inst in node.instances:
        if inst.state != "ready" or inst.function is None:
            continue
        if (inst.function, inst.function_version) in protected:
            continue
        spec = specs.get(inst.function)
        if spec is None:
            decisions.append(RecycleDecision(inst.instance, inst.function, "function deleted"))
            continue
        if spec.code_version != inst.function_version:
            decisions.append(RecycleDecision(inst.instance, inst.function, "holds an old version"))
            continue
        idle_s = spec.idle_s if spec.idle_s is not None else policy.default_idle_s
        if inst.idle_ms >= idle_s * 1000:
            reason = f"idle for {inst.idle_ms / 1000:.1f}s >= idle_s={idle_s:g}"
            decisions.append(RecycleDecision(inst.instance, inst.function, reason))
    return decisions
