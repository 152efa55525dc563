"""Pure decisions of a node agent: which instance serves an invocation, how many to start, what to recycle.

No processes and no Kafka here: the agent passes a snapshot of its instances and acts on the plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

PlanKind = Literal["warm", "prewarmed", "pool", "start", "evict", "wait"]


@dataclass(frozen=True)
class InstanceFacts:
    """What the decisions need to know about one instance."""

    id: str
    state: str
    function: str | None = None
    function_version: str | None = None
    uses: int = 0
    idle_ms: int = 0
    age_ms: int = 0
    prewarmed: bool = False
    """Specialized ahead of demand and not used yet."""


@dataclass(frozen=True)
class StartPlan:
    """How to get an instance for one invocation.

    ``warm``/``prewarmed``: use ``instance`` as it is. ``pool``: specialize generic ``instance``.
    ``start``: start a new instance (the launcher forks it from the zygote, or execs one where there
    is none). ``evict``: recycle idle ``instance`` (another function's), then start one.
    ``wait``: every slot is busy; wait for one to free up.
    """

    kind: PlanKind
    instance: str | None = None


def plan_start(
    instances: Sequence[InstanceFacts],
    function: str,
    version: str,
    *,
    max_instances: int,
    starting: int = 0,
) -> StartPlan:
    """Choose the fastest way to an instance of ``function@version``."""
    ready = [i for i in instances if i.state == "ready" and i.function == function and i.function_version == version]
    if ready:
        # Prefer an instance already used (warm caches) and the most recently used one, so the
        # others go idle and can be recycled by keep-alive; a prewarmed one is taken otherwise.
        used = [i for i in ready if not i.prewarmed]
        if used:
            return StartPlan("warm", min(used, key=lambda i: i.idle_ms).id)
        return StartPlan("prewarmed", ready[0].id)
    generic = [i for i in instances if i.state == "generic"]
    if generic:
        # A reset instance (it has been used) first, the most recently used of them: its caches
        # are warm, and untouched spares stay untouched. Among spares, the longest idle.
        return StartPlan("pool", max(generic, key=lambda i: (i.uses > 0, -i.idle_ms if i.uses else i.idle_ms)).id)
    if len(instances) + starting < max_instances:
        return StartPlan("start")
    idle_others = [i for i in instances if i.state == "ready"]
    if idle_others:
        return StartPlan("evict", max(idle_others, key=lambda i: i.idle_ms).id)
    return StartPlan("wait")


def generic_deficit(instances: Sequence[InstanceFacts], *, target: int, max_instances: int, starting: int = 0) -> int:
    """How many generic instances to start now to keep ``target`` of them, within capacity."""
    generic = sum(1 for i in instances if i.state == "generic")
    want = max(0, target - generic - starting)
    room = max(0, max_instances - len(instances) - starting)
    return min(want, room)


@dataclass(frozen=True)
class RecyclePolicy:
    """Per-function limits an agent enforces locally (keep-alive is the poolmgr's decision)."""

    max_invocations: int | None = None
    max_age_s: float | None = None


def due_for_recycling(instance: InstanceFacts, policy: RecyclePolicy) -> str | None:
    """The reason an idle specialized instance should be recycled now, or None."""
    if instance.state != "ready":
        return None
    if policy.max_invocations is not None and instance.uses >= policy.max_invocations:
        return f"served max_invocations={policy.max_invocations}"
    if policy.max_age_s is not None and instance.age_ms >= policy.max_age_s * 1000:
        return f"older than max_age_s={policy.max_age_s:g}"
    return None
