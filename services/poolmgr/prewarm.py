"""Pure prewarm decisions: which spec to prewarm, where, and whether it may become active.

A new commit becomes the active version only after enough instances hold its code (or after a
bounded wait), and never over a later push: ``pushed_ms`` orders pushes of one function.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from events import FunctionSpec, NodeHeartbeat, PrewarmRequested, now_ms
from events.placement import ROLE, RUNTIME_TOLERATION, Toleration
from services.common import placement


def target_spec(current: FunctionSpec, request: PrewarmRequested) -> FunctionSpec:
    """The spec to load: the current one with the requested artifact (if any) swapped in."""
    if request.digest is None or request.uri is None:
        return current
    source = current.source.model_copy(
        update={
            "digest": request.digest,
            "uri": request.uri,
            "git_commit": request.commit or current.source.git_commit,
            "build_id": request.build_id,
            "pushed_ms": request.pushed_ms,
            "size": None,
        }
    )
    return current.model_copy(update={"source": source})


def superseded(current: FunctionSpec, request: PrewarmRequested) -> bool:
    """A later push is already active: this build may finish but must never become active."""
    return request.activate and current.source.pushed_ms > request.pushed_ms


def activated(current: FunctionSpec, target: FunctionSpec) -> FunctionSpec:
    """``target`` as the function's next revision."""
    return target.model_copy(update={"revision": current.revision + 1, "updated_ms": now_ms()})


def holders(nodes: Iterable[NodeHeartbeat], function: str, version: str) -> set[str]:
    """The instances that hold ``function@version`` loaded (ready or busy)."""
    return {
        i.instance
        for node in nodes
        for i in node.instances
        if i.function == function and i.function_version == version and i.state in ("ready", "busy")
    }


def holding(nodes: Iterable[NodeHeartbeat], function: str, version: str) -> int:
    """How many instances hold ``function@version`` loaded (ready or busy)."""
    return len(holders(nodes, function, version))


def spread(
    nodes: Iterable[NodeHeartbeat],
    count: int,
    selector: Mapping[str, str] | None = None,
    tolerations: Iterable[Toleration] = (RUNTIME_TOLERATION,),
) -> dict[str, int]:
    """Specialize commands per node: ``count`` instances spread over eligible nodes, most room first."""
    wanted = {ROLE: "runtime"} if selector is None else selector
    tols = list(tolerations)
    candidates = [n for n in nodes if placement.eligible(n, wanted, tols)]
    if not candidates or count <= 0:
        return {}

    def room(n: NodeHeartbeat) -> tuple[int, int]:
        generic = sum(1 for i in n.instances if i.state == "generic")
        free = n.capacity.max_instances - len(n.instances)
        return generic, free

    ordered = sorted(candidates, key=lambda n: (not placement.prefers_not(n, tols), room(n), n.node), reverse=True)
    plan: dict[str, int] = {}
    for i in range(count):
        node = ordered[i % len(ordered)].node
        plan[node] = plan.get(node, 0) + 1
    return plan


@dataclass
class PendingPrewarm:
    """A prewarm the pool manager waits on."""

    request: PrewarmRequested
    target: FunctionSpec
    wanted: int
    started_ms: int = field(default_factory=now_ms)
    ready: set[str] = field(default_factory=set)
    failure: str | None = None

    @property
    def version(self) -> str:
        return self.target.code_version

    @property
    def done(self) -> bool:
        return self.failure is not None or len(self.ready) >= self.wanted
