"""Pure throttling decisions: from per-interval instance figures to clamp, isolate, kill, release.

In order of severity, on a sustained outlier (N consecutive intervals over its bounds):
clamp the instance's CPU quota to the normal bound; if the clamped instance keeps pressing on its
quota, isolate the function (new instances only on isolation nodes, the others drained); an
instance over its memory bound for N intervals is killed. After a quiet cool-down, each is released.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from events import FunctionSpec, NodeMetrics, PlacementOverride
from services.throttler.ranges import Bounds, NormalRanges, RangeConfig

ActionKind = Literal["clamp", "isolate", "kill", "release-clamp", "release-isolation"]


@dataclass(frozen=True)
class PolicyConfig:
    outlier_intervals: int = 2
    """Consecutive intervals over a bound before the first action (clamp, kill)."""
    isolate_after: int = 3
    """Further intervals a clamped instance presses on its quota before its function is isolated."""
    pressing_share: float = 0.3
    """Throttled time over this share of the interval: the instance still wants more CPU."""
    cooldown_s: float = 30.0
    """Quiet time before a clamp or an isolation is released."""
    isolation_s: float = 300.0
    """An isolation expires by itself after this long unless renewed."""
    ranges: RangeConfig = field(default_factory=RangeConfig)


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


class Throttler:
    """Judges every instance every interval; remembers what it did so it can release it."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.ranges = NormalRanges(config.ranges)
        self.instances: dict[str, _InstanceState] = {}
        self.isolated: dict[str, int] = {}
        self.isolated_until: dict[str, int] = {}
        """Isolations decided here, until when: the override table learns of them only later."""
        """Functions this throttler isolated -> when they were last seen abnormal (ms)."""

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
    ) -> list[Action]:
        c = self.config
        actions: list[Action] = []
        interval_ms = max(1, metrics.interval_ms)
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
            pressing = m.clamped and m.throttled_ms > c.pressing_share * interval_ms
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
                continue
            if state.cpu_over >= c.outlier_intervals and state.clamped_at_ms is None:
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
                    if state.pressing >= c.isolate_after and not self._isolated(m.function, overrides, now_ms):
                        actions.append(
                            Action(
                                "isolate",
                                m.function,
                                (
                                    f"clamped to {m.cpu_quota_millis}m and still throttled {m.throttled_ms:.0f}ms per "
                                    f"{interval_ms}ms for {state.pressing} intervals"
                                ),
                                until_ms=now_ms + int(c.isolation_s * 1000),
                                figures=figures,
                                **where,
                            )
                        )
                        self.isolated[m.function] = now_ms
                        self.isolated_until[m.function] = now_ms + int(c.isolation_s * 1000)
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
        return actions

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
                override = overrides.get(function)
                if override is not None and override.by == "throttler":
                    out.append(Action("release-isolation", function, f"quiet for {self.config.cooldown_s:g}s"))
        return out

    def forget(self, now_ms: int, older_than_s: float = 60.0) -> None:
        """Drop instances not seen for a while (gone)."""
        for iid, state in list(self.instances.items()):
            if now_ms - state.last_seen_ms > older_than_s * 1000:
                del self.instances[iid]
