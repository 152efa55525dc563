"""Pure placement rules, shared by the dispatcher (which node runs an invocation) and the pool
manager (where instances are prewarmed): Kubernetes node selectors, taints and tolerations.

- A node selector matches when every key/value is among the node's labels.
- A taint is tolerated by a toleration with the same key (or an empty key with ``Exists``), the
  same value (``Equal``; ``Exists`` ignores values) and the same effect (an empty effect matches all).
- NoSchedule and NoExecute taints must be tolerated; PreferNoSchedule only lowers the preference.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from events import FunctionSpec, NodeHeartbeat, Taint
from events.placement import PlacementOverride, Toleration


def tolerates(toleration: Toleration, taint: Taint) -> bool:
    if toleration.effect and toleration.effect != taint.effect:
        return False
    if toleration.operator == "Exists":
        return toleration.key in ("", taint.key)
    return toleration.key == taint.key and toleration.value == taint.value


def untolerated(node: NodeHeartbeat, tolerations: Iterable[Toleration]) -> list[Taint]:
    """The node's hard taints (NoSchedule, NoExecute) that no toleration covers."""
    tols = list(tolerations)
    return [t for t in node.taints if t.effect != "PreferNoSchedule" and not any(tolerates(x, t) for x in tols)]


def prefers_not(node: NodeHeartbeat, tolerations: Iterable[Toleration]) -> bool:
    """The node has a PreferNoSchedule taint the function does not tolerate."""
    tols = list(tolerations)
    return any(t.effect == "PreferNoSchedule" and not any(tolerates(x, t) for x in tols) for t in node.taints)


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def effective(
    spec: FunctionSpec, override: PlacementOverride | None, at_ms: int
) -> tuple[dict[str, str], list[Toleration]]:
    """The selector and tolerations in force for ``spec``: an active override replaces them."""
    if override is not None and override.active(at_ms):
        return dict(override.node_selector), list(override.tolerations)
    return dict(spec.node_selector), list(spec.tolerations)


def eligible(node: NodeHeartbeat, selector: Mapping[str, str], tolerations: Iterable[Toleration]) -> bool:
    """Whether an instance may be placed on ``node`` (cordoned nodes take nothing new)."""
    return not node.unschedulable and selector_matches(selector, node.labels) and not untolerated(node, tolerations)


def why_not(node: NodeHeartbeat, selector: Mapping[str, str], tolerations: Iterable[Toleration]) -> str:
    """A short reason a node is not eligible (for ``rejected`` results)."""
    if node.unschedulable:
        return f"{node.node}: cordoned"
    missing = {k: v for k, v in selector.items() if node.labels.get(k) != v}
    if missing:
        return f"{node.node}: labels do not match {missing}"
    taints = untolerated(node, tolerations)
    if taints:
        return f"{node.node}: untolerated taint {taints[0].key}={taints[0].value}:{taints[0].effect}"
    return f"{node.node}: eligible"


def must_leave(node: NodeHeartbeat, tolerations: Iterable[Toleration]) -> bool:
    """A NoExecute taint the function does not tolerate: its running instances are drained."""
    tols = list(tolerations)
    return any(t.effect == "NoExecute" and not any(tolerates(x, t) for x in tols) for t in node.taints)
