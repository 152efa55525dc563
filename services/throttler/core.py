"""The throttler's actions around its pure policy: what a node's metrics lead to, written out.

Everything it knows comes from the views it is given (functions, placement overrides, nodes) and
the metrics it is handed; everything it does is a ``publish`` (in the platform: the broker's).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from events import Clamp, NodeHeartbeat, NodeMetrics, PlacementOverride, Record, Recycle, ThrottleDecided, Topics
from services.throttler.fairness import NodeCapacity, NodePressure, pressure_of, read_host_pressure
from services.throttler.policy import Action, Throttler

log = logging.getLogger("stoker.throttler")

METRICS_TOO_OLD_MS = 10_000
"""Metrics older than this (a backlog after a restart) say nothing about now."""

Publish = Callable[[Record | None, str, bytes], Awaitable[Any]]
"""Publish one record (or a tombstone) to a topic under a key."""


class Rows(Protocol):
    """What the throttler needs of a view of a compacted topic: its rows."""

    @property
    def rows(self) -> Mapping[str, Any]: ...


class ThrottlerCore:
    """Turns node metrics into clamps, kills and isolations (decided by :class:`Throttler`) and publishes them."""

    def __init__(
        self,
        topics: Topics,
        throttler: Throttler,
        publish: Publish,
        *,
        functions: Rows,
        overrides: Rows,
        nodes: Rows,
        host_pressure: bool = False,
        read_pressure: Callable[[], NodePressure | None] = read_host_pressure,
    ) -> None:
        self.topics = topics
        self.throttler = throttler
        self._publish = publish
        self._functions = functions
        self._overrides = overrides
        self._nodes = nodes
        self._host_pressure = host_pressure
        self._read_pressure = read_pressure

    async def on_metrics(self, metrics: NodeMetrics, now: int) -> None:
        """One node's metrics: judge them and carry out what the policy decides."""
        if now - metrics.at_ms > METRICS_TOO_OLD_MS:
            return
        beat = self._nodes.rows.get(metrics.node)
        # The agent's own reading first: it ran on the node; this host's only for an embedded
        # platform whose (older) agents sent none.
        pressure: NodePressure | None = pressure_of(metrics)
        if pressure is None and self._host_pressure:
            pressure = self._read_pressure()
        capacity = (
            NodeCapacity(float(beat.capacity.cpu_millis), float(beat.capacity.memory_mb), pressure=pressure)
            if isinstance(beat, NodeHeartbeat)
            else NodeCapacity(pressure=pressure)
        )
        for action in self.throttler.observe(metrics, self._functions.rows, self._overrides.rows, now, capacity):
            await self.apply(action)

    async def tick(self, now: int) -> None:
        """Periodic duties: lift the clamps and isolations whose time is up, forget silent instances."""
        for action in self.throttler.releases(self._overrides.rows, now):
            await self.apply(action)
        self.throttler.forget(now)

    async def apply(self, action: Action) -> None:
        """Carry out one decision, then publish it as a ``throttle.decided`` event."""
        log.warning("%s %s on %s/%s: %s", action.kind, action.function, action.node, action.instance, action.rule)
        topics = self.topics
        key = action.function.encode()
        if action.kind in ("clamp", "release-clamp") and action.node and action.incarnation:
            clamp = Clamp(
                incarnation=action.incarnation,
                instance=action.instance,
                # No instance: every instance of the function on the node, and those it starts.
                function=action.function if action.instance is None else None,
                cpu_millis=action.cpu_millis if action.kind == "clamp" else None,
                reason=action.rule,
            )
            await self._publish(clamp, topics.work(action.node), key)
        elif action.kind == "kill" and action.node and action.incarnation:
            kill = Recycle(
                incarnation=action.incarnation,
                instance=action.instance,
                force=True,
                reason=f"killed by the throttler: {action.rule}",
            )
            await self._publish(kill, topics.work(action.node), key)
        elif action.kind == "isolate":
            override = PlacementOverride(
                function=action.function, until_ms=action.until_ms, reason=action.rule, by="throttler"
            )
            await self._publish(override, topics.placement, key)
            # Old instances drain: idle ones go now, busy ones when their invocation ends.
            for node in list(self._nodes.rows.values()):
                if isinstance(node, NodeHeartbeat) and node.labels.get("stoker.io/role") != "isolated":
                    drain = Recycle(
                        incarnation=node.incarnation,
                        function=action.function,
                        busy_too=True,
                        reason=f"isolated: {action.rule}",
                    )
                    await self._publish(drain, topics.work(node.node), key)
        elif action.kind == "release-isolation":
            await self._publish(None, topics.placement, key)
        decided = ThrottleDecided(
            function=action.function,
            action=action.kind,
            node=action.node,
            instance=action.instance,
            rule=action.rule,
            figures=action.figures,
        )
        await self._publish(decided, topics.throttle, key)
