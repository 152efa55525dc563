"""services.throttler.core with fake views, a fake policy and a fake publisher: what a decision becomes."""

from __future__ import annotations

import asyncio
from typing import Any

from events import (
    Clamp,
    NodeCapacity,
    NodeHeartbeat,
    NodeMetrics,
    PlacementOverride,
    Record,
    Recycle,
    ThrottleDecided,
    Topics,
)
from services.throttler.core import ThrottlerCore
from services.throttler.fairness import NodePressure
from services.throttler.policy import Action

TOPICS = Topics("t.")
T0 = 1_700_000_000_000


class FakeView:
    def __init__(self, rows: dict[str, Any] | None = None) -> None:
        self.rows: dict[str, Any] = dict(rows or {})


class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[Record | None, str, bytes]] = []

    async def __call__(self, record: Record | None, topic: str, key: bytes) -> None:
        self.sent.append((record, topic, key))

    def kinds(self) -> list[tuple[str, str]]:
        return [(type(r).__name__ if r is not None else "tombstone", t) for r, t, _ in self.sent]


class FakePolicy:
    """Returns the actions it is told to and remembers what it was shown."""

    def __init__(self, actions: list[Action] | None = None) -> None:
        self.actions = actions or []
        self.observed: list[tuple[NodeMetrics, int, Any]] = []
        self.forgotten: list[int] = []

    def observe(self, metrics: NodeMetrics, specs: Any, overrides: Any, now: int, capacity: Any) -> list[Action]:
        self.observed.append((metrics, now, capacity))
        return list(self.actions)

    def releases(self, overrides: Any, now: int) -> list[Action]:
        return list(self.actions)

    def forget(self, now: int) -> None:
        self.forgotten.append(now)


def _beat(node: str, role: str = "runtime") -> NodeHeartbeat:
    return NodeHeartbeat(
        node=node,
        incarnation=f"{node}-inc",
        labels={"stoker.io/role": role},
        capacity=NodeCapacity(cpu_millis=4000, memory_mb=8192),
    )


def _core(
    policy: FakePolicy, publisher: FakePublisher, nodes: dict[str, Any] | None = None, **kw: Any
) -> ThrottlerCore:
    return ThrottlerCore(
        TOPICS,
        policy,  # type: ignore[arg-type]
        publisher,
        functions=FakeView(),
        overrides=FakeView(),
        nodes=FakeView(nodes),
        **kw,
    )


def test_a_clamp_goes_to_the_nodes_work_topic_and_is_reported() -> None:
    pub = FakePublisher()
    core = _core(FakePolicy(), pub)
    action = Action("clamp", "hog", "cpu", node="n1", incarnation="n1-inc", instance="hog-1", cpu_millis=300)
    asyncio.run(core.apply(action))
    (clamp, topic, key), (decided, decided_topic, _) = pub.sent
    assert isinstance(clamp, Clamp) and topic == TOPICS.work("n1") and key == b"hog"
    assert (clamp.incarnation, clamp.instance, clamp.function, clamp.cpu_millis) == ("n1-inc", "hog-1", None, 300)
    assert isinstance(decided, ThrottleDecided) and decided_topic == TOPICS.throttle
    assert (decided.function, decided.action, decided.instance) == ("hog", "clamp", "hog-1")


def test_a_function_wide_release_names_the_function_and_no_quota() -> None:
    pub = FakePublisher()
    core = _core(FakePolicy(), pub)
    asyncio.run(core.apply(Action("release-clamp", "hog", "calm", node="n1", incarnation="n1-inc")))
    clamp = pub.sent[0][0]
    assert isinstance(clamp, Clamp) and (clamp.function, clamp.cpu_millis) == ("hog", None)


def test_a_kill_is_a_forced_recycle() -> None:
    pub = FakePublisher()
    core = _core(FakePolicy(), pub)
    asyncio.run(core.apply(Action("kill", "hog", "memory", node="n1", incarnation="n1-inc", instance="hog-1")))
    kill = pub.sent[0][0]
    assert isinstance(kill, Recycle) and kill.force and kill.instance == "hog-1"
    assert pub.kinds() == [("Recycle", TOPICS.work("n1")), ("ThrottleDecided", TOPICS.throttle)]


def test_a_clamp_without_a_node_is_only_reported() -> None:
    pub = FakePublisher()
    asyncio.run(_core(FakePolicy(), pub).apply(Action("clamp", "hog", "cpu")))
    assert pub.kinds() == [("ThrottleDecided", TOPICS.throttle)]


def test_an_isolation_overrides_placement_and_drains_every_node_but_the_isolated_ones() -> None:
    pub = FakePublisher()
    nodes = {"a": _beat("a"), "b": _beat("b"), "iso": _beat("iso", role="isolated"), "gone": None}
    core = _core(FakePolicy(), pub, nodes)
    asyncio.run(core.apply(Action("isolate", "hog", "noisy", until_ms=T0 + 300_000)))
    assert pub.kinds() == [
        ("PlacementOverride", TOPICS.placement),
        ("Recycle", TOPICS.work("a")),
        ("Recycle", TOPICS.work("b")),
        ("ThrottleDecided", TOPICS.throttle),
    ]
    override = pub.sent[0][0]
    assert isinstance(override, PlacementOverride) and (override.until_ms, override.by) == (T0 + 300_000, "throttler")
    drain = pub.sent[1][0]
    assert isinstance(drain, Recycle) and drain.busy_too and drain.function == "hog"


def test_the_end_of_an_isolation_is_a_tombstone_on_the_placement_topic() -> None:
    pub = FakePublisher()
    asyncio.run(_core(FakePolicy(), pub).apply(Action("release-isolation", "hog", "expired")))
    assert pub.sent[0] == (None, TOPICS.placement, b"hog")


def test_old_metrics_are_ignored_and_fresh_ones_judged_with_the_nodes_capacity() -> None:
    policy = FakePolicy([Action("clamp", "hog", "cpu", node="n1", incarnation="n1-inc", instance="hog-1")])
    pub = FakePublisher()
    core = _core(policy, pub, {"n1": _beat("n1")})
    asyncio.run(core.on_metrics(NodeMetrics(node="n1", incarnation="n1-inc", interval_ms=1000, at_ms=T0), T0 + 10_001))
    assert policy.observed == [] and pub.sent == []
    asyncio.run(core.on_metrics(NodeMetrics(node="n1", incarnation="n1-inc", interval_ms=1000, at_ms=T0), T0 + 10_000))
    [(_, now, capacity)] = policy.observed
    assert now == T0 + 10_000 and (capacity.cpu_millis, capacity.memory_mb) == (4000.0, 8192.0)
    assert capacity.pressure is None
    assert pub.kinds() == [("Clamp", TOPICS.work("n1")), ("ThrottleDecided", TOPICS.throttle)]


def test_this_hosts_pressure_stands_in_only_when_asked_for() -> None:
    host = NodePressure(cpu_some_pct=50.0, runnable=9, cores=2)
    metrics = NodeMetrics(node="unknown", incarnation="x", interval_ms=1000, at_ms=T0)
    for asked, expected in ((False, None), (True, host)):
        policy = FakePolicy()
        core = _core(policy, FakePublisher(), host_pressure=asked, read_pressure=lambda: host)
        asyncio.run(core.on_metrics(metrics, T0))
        assert policy.observed[0][2].pressure == expected


def test_a_tick_carries_out_the_releases_and_forgets() -> None:
    policy = FakePolicy([Action("release-isolation", "hog", "expired")])
    pub = FakePublisher()
    asyncio.run(_core(policy, pub).tick(T0))
    assert pub.kinds() == [("tombstone", TOPICS.placement), ("ThrottleDecided", TOPICS.throttle)]
    assert policy.forgotten == [T0]
