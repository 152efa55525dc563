"""Pure throttling decisions: from per-interval figures to clamp, isolate, kill, release.

Two judgments every interval, both on N consecutive intervals so a short burst is never punished:

- **Per instance** (against the normal range, :mod:`services.throttler.ranges`): an instance over
  its CPU bound is clamped to the bound (not on a node whose pressure figures show that nothing
  waits for a CPU: busy there hurts no one); if the clamped instance keeps pressing on its quota
  (throttled and using it), its function is isolated (new instances only on isolation nodes, the
  others drained), unless the node's pressure shows nothing waits for a CPU there (busy, not
  hurting anyone). An instance over its memory bound is killed; a second such kill of the same
  function within the cool-down isolates it.
- **Per function per node** (:mod:`services.throttler.fairness`): the sum of a function's instances
  on a node against its fair share of the node (capacity split evenly among the functions active
  there), while other functions need the node and, for CPU, work waits for a CPU. This catches
  what each instance alone hides: many short concurrent spinners, a memory grower spread over
  instances, a fork-heavy function. Such a function has every instance on that node clamped to
  its fair share; if it keeps taking more (its demand, use plus throttled time, still over the
  share) for ``isolate_after`` intervals, it is isolated. A function alone on its node, or on a
  node without pressure, is never judged this way.

An isolated function keeps a clamp where it goes: on a node whose pressure shows work waiting for
a CPU, its instances get the per-instance quota it had when it was isolated (at most its fair
share of the node it was isolated from). An isolation node that shares its host's CPUs with the
runtime nodes (an embedded platform, this machine) otherwise hands the hog the same cores again;
on a calm isolation host (nothing waits) it runs free, as before.

After a quiet cool-down, each is released. Every action carries the rule and the figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from events import FunctionSpec, NodeMetrics, PlacementOverride
from services.throttler.fairness import FairnessConfig, NodeCapacity, Verdict, judge_node
from services.throttler.ranges import Bounds, NormalRanges, RangeConfig

ActionKind = Literal["clamp", "isolate", "kill", "release-clamp", "release-isolation"]


@dataclass(frozen=True)
class PolicyConfig:
    outlier_intervals: int = 2
    """Consecutive intervals over a bound before the first action (clamp, kill)."""
    isolate_after: int = 3
    """Further intervals a clamped instance presses on its quota before its function is isolated."""
    pressing_share: float = 0.1
    """Throttled time over this share of the interval, using most of its quota: the instance still
    wants more CPU. (A 1000m spinner clamped to 800m is throttled about 20% of the time.)"""
    pressing_use: float = 0.8
    """Share of its quota a clamped instance must use to count as pressing on it."""
    min_quota_millis: int = 100
    """Least CPU quota a function-level clamp gives one instance."""
    cooldown_s: float = 30.0
    """Quiet time before a clamp or an isolation is released."""
    isolation_s: float = 300.0
    """An isolation expires by itself after this long unless renewed."""
    ranges: RangeConfig = field(default_factory=RangeConfig)
    fairness: FairnessConfig = field(default_factory=FairnessConfig)


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    function: str
    rule: str
    node: str | None = None
    incarnation: str | None = None
    instance: str | None = None
    cpu_millis: int | None = None
    until_ms: int | None = None
    figures: dict[str, float] = field(default_factory=dict)


@dataclass
class _InstanceState:
    node: str
    incarnation: str
    function: str | None
    cpu_over: int = 0
    memory_over: int = 0
    clamped_at_ms: int | None = None
    pressing: int = 0
    quiet_since_ms: int | None = None
    last_seen_ms: int = 0


@dataclass
class _FunctionOnNode:
    """A function's streaks on one node (the per-function judgment)."""

    over: int = 0
    clamped_millis: int | None = None
    pressing: int = 0
    quiet_since_ms: int | None = None
    last_seen_ms: int = 0


class Throttler:
    """Judges every instance every interval; remembers what it did so it can release it."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.ranges = NormalRanges(config.ranges)
        self.instances: dict[str, _InstanceState] = {}
        self.isolated: dict[str, int] = {}
        """Functions this throttler isolated -> when they were last seen abnormal (ms)."""
        self.isolated_until: dict[str, int] = {}
        """Isolations decided here, until when: the override table learns of them only later."""
        self.on_node: dict[tuple[str, str], _FunctionOnNode] = {}
        """(node, function) -> its per-function streaks there."""
        self.memory_kills: dict[str, int] = {}
        """function -> when one of its instances was last killed over its memory bound."""
        self.isolation_quota: dict[str, int] = {}
        self.function_clamped: dict[str, set[tuple[str, str]]] = {}
        """function isolated here -> the (node, incarnation)s told to start its new instances clamped."""
        """function isolated here -> the per-instance CPU quota it carries to nodes under pressure."""

    def bounds(self, function: str | None, spec: FunctionSpec | None) -> Bounds:
        return self.ranges.for_function(
            function,
            spec.normal_cpu_millis if spec is not None else None,
            spec.normal_memory_mb if spec is not None else None,
        )

    def observe(
        self,
        metrics: NodeMetrics,
        specs: Mapping[str, FunctionSpec],
        overrides: Mapping[str, PlacementOverride],
        now_ms: int,
        node: NodeCapacity | None = None,
    ) -> list[Action]:
        """The actions one interval of one node calls for. ``node``: its capacity and, when known,
        its pressure (the defaults of :class:`NodeCapacity` without it)."""
        c = self.config
        actions: list[Action] = []
        interval_ms = max(1, metrics.interval_ms)
        verdicts = judge_node(metrics, node or NodeCapacity(), c.fairness)
        for m in metrics.instances:
            if m.state not in ("busy", "ready") or m.function is None:
                continue  # generic instances run no user code
            state = self.instances.get(m.instance)
            if state is None:
                state = self.instances[m.instance] = _InstanceState(metrics.node, metrics.incarnation, m.function)
            state.last_seen_ms = now_ms
            spec = specs.get(m.function)
            bounds = self.bounds(m.function, spec)
            cpu_out = m.cpu_millis > bounds.cpu_millis and not m.clamped
            mem_out = m.memory_mb > bounds.memory_mb
            quota = m.cpu_quota_millis
            pressing = (
                m.clamped
                and m.throttled_ms > c.pressing_share * interval_ms
                and (quota is None or m.cpu_millis >= c.pressing_use * quota)
            )
            self.ranges.learn(m.function, m.cpu_millis, m.memory_mb, outlier=cpu_out or mem_out or pressing)
            state.cpu_over = state.cpu_over + 1 if cpu_out else 0
            state.memory_over = state.memory_over + 1 if mem_out else 0
            figures = {
                "cpu_millis": m.cpu_millis,
                "memory_mb": m.memory_mb,
                "throttled_ms": m.throttled_ms,
                "cpu_bound": round(bounds.cpu_millis, 1),
                "memory_bound": round(bounds.memory_mb, 1),
            }
            where: dict[str, Any] = {"node": metrics.node, "incarnation": metrics.incarnation, "instance": m.instance}
            if state.memory_over >= c.outlier_intervals:
                actions.append(
                    Action(
                        "kill",
                        m.function,
                        (
                            f"memory {m.memory_mb:.0f}MB > {bounds.memory_mb:.0f}MB for {state.memory_over} intervals "
                            f"({bounds.source} range)"
                        ),
                        figures=figures,
                        **where,
                    )
                )
                state.memory_over = 0
                killed_before = self.memory_kills.get(m.function)
                self.memory_kills[m.function] = now_ms
                if (
                    killed_before is not None
                    and now_ms - killed_before <= c.cooldown_s * 1000
                    and not self._isolated(m.function, overrides, now_ms)
                ):
                    actions.append(
                        self._isolate(
                            m.function,
                            f"memory over its bound again {(now_ms - killed_before) / 1000:.0f}s after an instance "
                            f"was killed for it ({m.memory_mb:.0f}MB > {bounds.memory_mb:.0f}MB)",
                            now_ms,
                            figures,
                            where,
                        )
                    )
                continue
            verdict = verdicts.get(m.function)
            # Busy, not hurting: the node's pressure figures show nothing waits for a CPU there.
            calm_node = verdict is not None and verdict.pressure is False
            if state.cpu_over >= c.outlier_intervals and state.clamped_at_ms is None and not calm_node:
                quota = int(bounds.cpu_millis)
                actions.append(
                    Action(
                        "clamp",
                        m.function,
                        (
                            f"cpu {m.cpu_millis:.0f}m > {bounds.cpu_millis:.0f}m for {state.cpu_over} intervals "
                            f"({bounds.source} range)"
                        ),
                        cpu_millis=quota,
                        figures=figures,
                        **where,
                    )
                )
                state.clamped_at_ms, state.cpu_over, state.quiet_since_ms = now_ms, 0, None
                continue
            if state.clamped_at_ms is not None:
                if pressing:
                    state.pressing += 1
                    state.quiet_since_ms = None
                    if (
                        state.pressing >= c.isolate_after
                        and not calm_node
                        and not self._isolated(m.function, overrides, now_ms)
                    ):
                        carried = m.cpu_quota_millis or int(bounds.cpu_millis)
                        if verdict is not None and verdict.pressure:
                            carried = min(carried, int(verdict.cpu_fair_millis / max(1, len(verdict.usage.instances))))
                        actions.append(
                            self._isolate(
                                m.function,
                                f"clamped to {m.cpu_quota_millis}m and still throttled {m.throttled_ms:.0f}ms per "
                                f"{interval_ms}ms for {state.pressing} intervals",
                                now_ms,
                                {**figures, **(verdict.figures if verdict is not None else {})},
                                where,
                                quota=max(c.min_quota_millis, carried),
                            )
                        )
                    elif m.function in self.isolated:
                        self.isolated[m.function] = now_ms
                elif not m.clamped and m.cpu_millis > bounds.cpu_millis:
                    # The clamp did not take (lost command, new instance): not quiet; send it again.
                    state.quiet_since_ms = None
                    if m.function in self.isolated:
                        self.isolated[m.function] = now_ms
                    # (cpu_over counts these samples, above.) One more interval of grace: the sample
                    # right after a clamp was measured before it took effect.
                    if state.cpu_over > c.outlier_intervals:
                        state.cpu_over = 0
                        actions.append(
                            Action(
                                "clamp",
                                m.function,
                                (f"cpu {m.cpu_millis:.0f}m > {bounds.cpu_millis:.0f}m and its clamp is not in force"),
                                cpu_millis=int(bounds.cpu_millis),
                                figures=figures,
                                **where,
                            )
                        )
                else:
                    state.pressing = 0
                    state.quiet_since_ms = state.quiet_since_ms or now_ms
                    if now_ms - state.quiet_since_ms >= c.cooldown_s * 1000:
                        actions.append(
                            Action(
                                "release-clamp",
                                m.function,
                                (f"quiet for {c.cooldown_s:g}s under its clamp"),
                                figures=figures,
                                **where,
                            )
                        )
                        state.clamped_at_ms = state.quiet_since_ms = None
            elif m.function in self.isolated and (cpu_out or mem_out):
                self.isolated[m.function] = now_ms  # still abnormal where it runs now
        # An instance the per-instance judgment clamped just now keeps that (stricter) quota.
        just_clamped = {a.instance for a in actions if a.kind == "clamp"}
        for verdict in verdicts.values():
            actions.extend(self._judge_function(metrics, verdict, overrides, now_ms, just_clamped))
        just_clamped |= {a.instance for a in actions if a.kind == "clamp"}
        for verdict in verdicts.values():
            actions.extend(self._carry_isolation_clamp(metrics, verdict, now_ms, just_clamped))
        return actions

    def _carry_isolation_clamp(
        self, metrics: NodeMetrics, v: Verdict, now_ms: int, just_clamped: set[str | None]
    ) -> list[Action]:
        """An isolated function's unclamped instances on a node where work waits: its carried quota."""
        quota = self.isolation_quota.get(v.function)
        if quota is None or not v.pressure or v.function not in self.isolated:
            return []
        out = []
        told = self.function_clamped.setdefault(v.function, set())
        if (metrics.node, metrics.incarnation) not in told:
            # Once per node: its agent starts every new instance of the function with the quota
            # (a short-call function starts new instances all the time; each would run a whole
            # interval unclamped before the per-instance clamp below caught it).
            told.add((metrics.node, metrics.incarnation))
            out.append(
                Action(
                    "clamp",
                    v.function,
                    f"isolated, and work waits for a CPU on {metrics.node} too: {quota}m for each of its "
                    "instances there, new ones included",
                    node=metrics.node,
                    incarnation=metrics.incarnation,
                    cpu_millis=quota,
                    figures=v.figures,
                )
            )
        for instance in v.usage.unclamped:
            if instance in just_clamped:
                continue
            out.append(
                Action(
                    "clamp",
                    v.function,
                    f"isolated, and work waits for a CPU on {metrics.node} too: the {quota}m per instance it "
                    "was isolated with",
                    node=metrics.node,
                    incarnation=metrics.incarnation,
                    instance=instance,
                    cpu_millis=quota,
                    figures=v.figures,
                )
            )
            state = self.instances.get(instance)
            if state is not None and state.clamped_at_ms is None:
                # Released like any clamp: after a quiet cool-down under it.
                state.clamped_at_ms, state.cpu_over, state.quiet_since_ms = now_ms, 0, None
        return out

    def _judge_function(
        self,
        metrics: NodeMetrics,
        v: Verdict,
        overrides: Mapping[str, PlacementOverride],
        now_ms: int,
        just_clamped: set[str | None],
    ) -> list[Action]:
        """The per-function judgment of one function on one node (see the module's docstring)."""
        c = self.config
        key = (metrics.node, v.function)
        state = self.on_node.get(key)
        if state is None:
            if not v.hurting_others:
                return []
            state = self.on_node[key] = _FunctionOnNode()
        state.last_seen_ms = now_ms
        where: dict[str, Any] = {"node": metrics.node, "incarnation": metrics.incarnation}
        rule = "; ".join(v.hogging)
        out: list[Action] = []
        if state.clamped_millis is None:
            state.over = state.over + 1 if v.hurting_others else 0
            if state.over >= c.outlier_intervals:
                quota = max(c.min_quota_millis, int(v.cpu_fair_millis / max(1, len(v.usage.instances))))
                state.clamped_millis, state.over, state.pressing, state.quiet_since_ms = quota, 0, 0, None
                reason = (
                    f"function on {metrics.node} for {c.outlier_intervals} intervals: {rule}; "
                    f"its {len(v.usage.instances)} instance(s) clamped to {quota}m each"
                )
                out.extend(self._clamp_each(v, reason, quota, just_clamped, where))
            elif not v.hurting_others:
                del self.on_node[key]
            return out
        # Clamped here: new instances get the same quota; still taking more isolates it.
        out.extend(
            self._clamp_each(
                v,
                f"a new instance of a function clamped on {metrics.node}: {state.clamped_millis}m",
                state.clamped_millis,
                just_clamped,
                where,
            )
        )
        if v.hurting_others:
            state.pressing += 1
            state.quiet_since_ms = None
            if v.function in self.isolated:
                self.isolated[v.function] = now_ms
            elif state.pressing >= c.isolate_after and not self._isolated(v.function, overrides, now_ms):
                out.append(
                    self._isolate(
                        v.function,
                        f"clamped to {state.clamped_millis}m per instance on {metrics.node} and still, "
                        f"for {state.pressing} intervals: {rule}",
                        now_ms,
                        v.figures,
                        where,
                        quota=state.clamped_millis,
                    )
                )
        else:
            state.pressing = 0
            state.quiet_since_ms = state.quiet_since_ms or now_ms
            if now_ms - state.quiet_since_ms >= c.cooldown_s * 1000:
                del self.on_node[key]
                out.append(
                    Action(
                        "release-clamp",
                        v.function,
                        f"within its share on {metrics.node} for {c.cooldown_s:g}s",
                        figures=v.figures,
                        **where,
                    )
                )
        return out

    def _clamp_each(
        self, v: Verdict, rule: str, quota: int, just_clamped: set[str | None], where: Mapping[str, Any]
    ) -> list[Action]:
        """One clamp per instance of the function not clamped yet: never a looser quota for one that is."""
        return [
            Action("clamp", v.function, rule, instance=instance, cpu_millis=quota, figures=v.figures, **where)
            for instance in v.usage.unclamped
            if instance not in just_clamped
        ]

    def _isolate(
        self,
        function: str,
        rule: str,
        now_ms: int,
        figures: dict[str, float],
        where: Mapping[str, Any],
        quota: int | None = None,
    ) -> Action:
        """``quota``: the per-instance CPU quota the function carries to nodes under pressure (none
        for a memory isolation)."""
        until = now_ms + int(self.config.isolation_s * 1000)
        self.isolated[function] = now_ms
        self.isolated_until[function] = until
        if quota is not None:
            self.isolation_quota[function] = quota
            figures = {**figures, "carried_quota_millis": float(quota)}
        return Action("isolate", function, rule, until_ms=until, figures=figures, **where)

    def _isolated(self, function: str, overrides: Mapping[str, PlacementOverride], now_ms: int) -> bool:
        if self.isolated_until.get(function, 0) > now_ms:
            return True
        override = overrides.get(function)
        return override is not None and override.active(now_ms)

    def releases(self, overrides: Mapping[str, PlacementOverride], now_ms: int) -> list[Action]:
        """Isolations this throttler made whose function has been quiet for the cool-down."""
        out = []
        for function, last_bad in list(self.isolated.items()):
            if now_ms - last_bad >= self.config.cooldown_s * 1000:
                del self.isolated[function]
                self.isolated_until.pop(function, None)
                self.isolation_quota.pop(function, None)
                for node, incarnation in sorted(self.function_clamped.pop(function, set())):
                    out.append(
                        Action(
                            "release-clamp",
                            function,
                            f"isolation over: new instances on {node} start with the function's own quota",
                            node=node,
                            incarnation=incarnation,
                        )
                    )
                override = overrides.get(function)
                if override is not None and override.by == "throttler":
                    out.append(Action("release-isolation", function, f"quiet for {self.config.cooldown_s:g}s"))
        return out

    def forget(self, now_ms: int, older_than_s: float = 60.0) -> None:
        """Drop instances (and functions on nodes) not seen for a while (gone)."""
        for iid, state in list(self.instances.items()):
            if now_ms - state.last_seen_ms > older_than_s * 1000:
                del self.instances[iid]
        for key, fn in list(self.on_node.items()):
            if now_ms - fn.last_seen_ms > older_than_s * 1000:
                del self.on_node[key]
        for function, at in list(self.memory_kills.items()):
            if now_ms - at > older_than_s * 1000:
                del self.memory_kills[function]
