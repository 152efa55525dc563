"""Unit tests of services.throttler.policy: clamp, isolate, kill and their releases, interval by interval."""

from __future__ import annotations

from collections.abc import Iterable

from events import CodeSource, FunctionSpec, InstanceMetrics, NodeMetrics, PlacementOverride
from services.throttler.policy import Action, PolicyConfig, Throttler

DIGEST = "sha256:" + "ab" * 32
T0 = 1_700_000_000_000
"""A realistic epoch-ms start (the policy treats timestamps as wall-clock)."""
SEC = 1000

Overrides = dict[str, PlacementOverride]


def _spec(name: str, normal_cpu: float | None = None, normal_memory: float | None = None) -> FunctionSpec:
    return FunctionSpec(
        name=name,
        entrypoint="handler:main",
        source=CodeSource(digest=DIGEST),
        normal_cpu_millis=normal_cpu,
        normal_memory_mb=normal_memory,
    )


def _inst(
    instance: str = "hog-1",
    function: str | None = "hog",
    cpu: float = 1000.0,
    memory: float = 40.0,
    state: str = "busy",
    throttled: float = 0.0,
    quota: int | None = 1000,
    clamped: bool = False,
) -> InstanceMetrics:
    return InstanceMetrics(
        instance=instance,
        function=function,
        state=state,
        cpu_millis=cpu,
        memory_mb=memory,
        throttled_ms=throttled,
        cpu_quota_millis=quota,
        clamped=clamped,
    )


def _clamped(
    instance: str = "hog-1", function: str = "hog", throttled: float = 700.0, cpu: float = 300.0
) -> InstanceMetrics:
    """A hog under a 300m clamp: it wants 1000m, gets 300m and is held back ~700ms per second."""
    return _inst(instance, function, cpu=cpu, throttled=throttled, quota=300, clamped=True)


def _calm(n: int = 10) -> list[InstanceMetrics]:
    """Idle neighbours: they keep the platform range at its floor (300m, 128MB)."""
    return [_inst(f"calm-{i}", "calm", cpu=20.0, memory=30.0, state="ready") for i in range(n)]


def _node(instances: Iterable[InstanceMetrics], node: str = "n1", interval_ms: int = 1000) -> NodeMetrics:
    return NodeMetrics(node=node, incarnation=f"{node}-inc", interval_ms=interval_ms, instances=list(instances))


def _override(function: str = "hog", until_ms: int | None = None, by: str = "throttler") -> PlacementOverride:
    return PlacementOverride(function=function, until_ms=until_ms, by=by)


def _kinds(actions: list[Action]) -> list[str]:
    return [a.kind for a in actions]


class Sim:
    """Feeds one NodeMetrics per interval at 1 s steps and records the actions."""

    def __init__(self, config: PolicyConfig | None = None, specs: dict[str, FunctionSpec] | None = None) -> None:
        self.throttler = Throttler(config or PolicyConfig())
        self.specs = specs or {}
        self.overrides: Overrides = {}
        self.now = T0
        self.interval = 0

    def step(self, *instances: InstanceMetrics, calm: bool = True) -> list[Action]:
        self.interval += 1
        self.now += SEC
        batch = [*instances, *(_calm() if calm else [])]
        return self.throttler.observe(_node(batch), self.specs, self.overrides, self.now)

    def clamp_hog(self) -> Action:
        """Two intervals at 1000m: the second one clamps."""
        assert self.step(_inst()) == []
        [clamp] = self.step(_inst())
        assert clamp.kind == "clamp"
        return clamp


# --- clamp ---------------------------------------------------------------------------------------


def test_cpu_outlier_for_n_intervals_is_clamped_once_to_the_bound() -> None:
    sim = Sim()
    assert sim.step(_inst()) == []  # N-1 = 1 interval: nothing yet
    actions = sim.step(_inst())
    assert len(actions) == 1
    clamp = actions[0]
    assert clamp.kind == "clamp"
    assert clamp.function == "hog"
    assert (clamp.node, clamp.incarnation, clamp.instance) == ("n1", "n1-inc", "hog-1")
    assert clamp.cpu_millis == 300  # the platform bound (its floor: the neighbours are idle)
    assert clamp.rule == "cpu 1000m > 300m for 2 intervals (platform range)"
    assert clamp.figures["cpu_millis"] == 1000.0
    assert clamp.figures["cpu_bound"] == 300.0
    assert clamp.figures["memory_bound"] == 128.0
    # Once clamped, never clamped again: neither while the clamp is in force...
    for _ in range(5):
        assert "clamp" not in _kinds(sim.step(_clamped(throttled=0.0, cpu=250.0)))
    # ...nor if a sample still shows it unclamped (the Clamp command not applied yet)...
    assert "clamp" not in _kinds(sim.step(_inst()))
    assert "clamp" not in _kinds(sim.step(_inst()))
    # ...but a clamp that never takes is sent again.
    assert _kinds(sim.step(_inst())) == ["clamp"]


def test_n_minus_one_intervals_are_not_enough() -> None:
    sim = Sim(PolicyConfig(outlier_intervals=4))
    for _ in range(3):
        assert sim.step(_inst()) == []
    assert _kinds(sim.step(_inst())) == ["clamp"]


def test_an_interrupted_streak_starts_over() -> None:
    sim = Sim()
    assert sim.step(_inst()) == []
    assert sim.step(_inst(cpu=100.0)) == []  # back to normal: the streak resets
    assert sim.step(_inst()) == []  # 1 again, not 2
    [clamp] = sim.step(_inst())
    assert clamp.kind == "clamp"
    assert "for 2 intervals" in clamp.rule


def test_at_the_bound_is_not_over_it() -> None:
    sim = Sim()
    for _ in range(5):
        assert sim.step(_inst(cpu=300.0)) == []


def test_clamp_judged_by_the_function_baseline() -> None:
    """A function that learned it normally uses ~50m and jumps to 250m is caught below the platform's 300m."""
    config = PolicyConfig()
    sim = Sim(config)
    for i in range(config.ranges.baseline_min_samples):
        assert sim.step(_inst("f-1", "steady", cpu=40.0 if i % 2 else 60.0)) == []
    assert sim.step(_inst("f-1", "steady", cpu=250.0)) == []
    [clamp] = sim.step(_inst("f-1", "steady", cpu=250.0))
    assert clamp.kind == "clamp"
    assert clamp.cpu_millis == 150  # max(floor / 2, median + k·MAD, 2 x median) = max(150, 124, 100)
    assert clamp.rule == "cpu 250m > 150m for 2 intervals (function baseline range)"


def test_spec_normal_cpu_overrides_the_learned_range() -> None:
    sim = Sim(specs={"hog": _spec("hog", normal_cpu=1500.0), "tight": _spec("tight", normal_cpu=100.0)})
    for _ in range(5):
        assert sim.step(_inst()) == []  # 1000m is normal for this one: its spec says so
    assert sim.step(_inst("t-1", "tight", cpu=150.0)) == []
    [clamp] = sim.step(_inst("t-1", "tight", cpu=150.0))
    assert (clamp.kind, clamp.cpu_millis) == ("clamp", 100)
    assert clamp.rule.endswith("(function spec range)")


def test_generic_and_functionless_instances_are_ignored() -> None:
    sim = Sim()
    others = [
        _inst("g-1", None, cpu=4000.0, memory=4000.0, state="generic"),
        _inst("g-2", None, cpu=4000.0, memory=4000.0, state="ready"),  # no function: runs no user code
        _inst("s-1", "hog", cpu=4000.0, memory=4000.0, state="specializing"),
        _inst("st-1", "hog", cpu=4000.0, memory=4000.0, state="starting"),
    ]
    for _ in range(5):
        assert sim.step(*others, calm=False) == []
    assert sim.throttler.instances == {}
    assert len(sim.throttler.ranges.cpu.values) == 0  # they do not feed the normal range either


def test_ready_and_busy_instances_are_both_judged() -> None:
    sim = Sim()
    sim.step(_inst("a", state="ready"), _inst("b", state="busy"))
    actions = sim.step(_inst("a", state="ready"), _inst("b", state="busy"))
    assert sorted((a.kind, a.instance) for a in actions) == [("clamp", "a"), ("clamp", "b")]


# --- isolate -------------------------------------------------------------------------------------


def test_clamped_instance_still_pressing_isolates_its_function_once() -> None:
    config = PolicyConfig()
    sim = Sim(config)
    sim.clamp_hog()
    for _ in range(config.isolate_after - 1):
        assert sim.step(_clamped()) == []
    actions = sim.step(_clamped())
    assert len(actions) == 1
    isolate = actions[0]
    assert isolate.kind == "isolate"
    assert isolate.function == "hog"
    assert isolate.until_ms == sim.now + int(config.isolation_s * 1000)
    assert isolate.rule == "clamped to 300m and still throttled 700ms per 1000ms for 3 intervals"
    assert isolate.figures["throttled_ms"] == 700.0
    # The override it asked for is now in force: no second isolation while it lasts.
    sim.overrides["hog"] = _override(until_ms=isolate.until_ms)
    for _ in range(20):
        assert sim.step(_clamped()) == []


def test_pressing_under_the_share_does_not_isolate() -> None:
    sim = Sim()
    sim.clamp_hog()
    for _ in range(10):  # 50ms of 1000ms < 10%
        assert sim.step(_clamped(throttled=50.0)) == []


def test_a_hog_clamped_at_the_800m_ceiling_is_throttled_20_percent_and_still_isolated() -> None:
    sim = Sim()
    sim.clamp_hog()
    hog = _inst(cpu=800.0, throttled=200.0, quota=800, clamped=True)
    assert [sim.step(hog) for _ in range(2)] == [[], []]
    [isolate] = sim.step(hog)
    assert isolate.kind == "isolate" and "throttled 200ms per 1000ms for 3 intervals" in isolate.rule


def test_a_clamped_instance_not_using_its_quota_is_not_pressing() -> None:
    sim = Sim()
    sim.clamp_hog()
    for _ in range(10):  # throttled in bursts but using a third of its 300m quota
        assert sim.step(_clamped(throttled=400.0, cpu=100.0)) == []


def test_pressing_share_is_relative_to_the_interval() -> None:
    """With a 5 s interval, 300ms throttled is only 6%: not pressing."""
    throttler = Throttler(PolicyConfig())
    now = T0
    for _ in range(2):
        now += 5 * SEC
        throttler.observe(_node([_inst(), *_calm()], interval_ms=5000), {}, {}, now)
    for _ in range(5):  # 25 s: under the 30 s cool-down, so nothing at all
        now += 5 * SEC
        assert throttler.observe(_node([_clamped(throttled=300.0), *_calm()], interval_ms=5000), {}, {}, now) == []


def test_interrupted_pressing_starts_over() -> None:
    sim = Sim()
    sim.clamp_hog()
    assert sim.step(_clamped()) == []
    assert sim.step(_clamped()) == []
    assert sim.step(_clamped(throttled=0.0, cpu=100.0)) == []  # it eased off
    assert sim.step(_clamped()) == []
    assert sim.step(_clamped()) == []
    assert _kinds(sim.step(_clamped())) == ["isolate"]


def test_an_existing_user_override_means_no_isolation() -> None:
    sim = Sim()
    sim.overrides["hog"] = _override(by="user")  # no until: in force indefinitely
    sim.clamp_hog()
    for _ in range(10):
        assert sim.step(_clamped()) == []


def test_an_expired_isolation_is_renewed_if_the_function_still_presses() -> None:
    config = PolicyConfig(isolation_s=10.0)
    sim = Sim(config)
    sim.clamp_hog()
    for _ in range(2):
        sim.step(_clamped())
    [isolate] = sim.step(_clamped())
    assert isolate.until_ms is not None
    sim.overrides["hog"] = _override(until_ms=isolate.until_ms)
    renewed: list[Action] = []
    while not renewed:
        renewed = sim.step(_clamped())
        assert sim.now <= isolate.until_ms  # nothing new before it expires
    assert _kinds(renewed) == ["isolate"]
    assert renewed[0].until_ms == sim.now + 10 * SEC


def test_two_pressing_instances_of_one_function_isolate_it_once() -> None:
    """The isolation is per function: two clamped, pressing instances must not produce two ``isolate``
    actions (each publishes a PlacementOverride, drains every node and records a decision)."""
    sim = Sim()
    sim.step(_inst("hog-1"), _inst("hog-2"))
    assert _kinds(sim.step(_inst("hog-1"), _inst("hog-2"))) == ["clamp", "clamp"]
    sim.step(_clamped("hog-1"), _clamped("hog-2"))
    sim.step(_clamped("hog-1"), _clamped("hog-2"))
    actions = sim.step(_clamped("hog-1"), _clamped("hog-2"))
    assert _kinds(actions) == ["isolate"]


def test_isolation_is_not_repeated_before_its_override_is_seen() -> None:
    """The override table is a view of the compacted placement topic and lags the decision: another
    node's metrics of the same interval, arriving a few ms later, must not isolate the function again."""
    throttler = Throttler(PolicyConfig())
    now = T0
    kinds: list[str] = []
    for interval in range(5):
        now += SEC
        for offset, node in enumerate(("n1", "n2")):
            hog = _inst(f"hog-{node}") if interval < 2 else _clamped(f"hog-{node}")
            actions = throttler.observe(_node([hog, *_calm()], node=node), {}, {}, now + 10 * offset)
            kinds += _kinds(actions)
    assert kinds == ["clamp", "clamp", "isolate"]


# --- kill ----------------------------------------------------------------------------------------


def test_memory_over_the_bound_for_n_intervals_kills_the_instance() -> None:
    sim = Sim()
    assert sim.step(_inst(cpu=10.0, memory=900.0)) == []
    actions = sim.step(_inst(cpu=10.0, memory=900.0))
    assert len(actions) == 1
    kill = actions[0]
    assert kill.kind == "kill"
    assert (kill.function, kill.node, kill.incarnation, kill.instance) == ("hog", "n1", "n1-inc", "hog-1")
    assert kill.rule == "memory 900MB > 128MB for 2 intervals (platform range)"
    assert kill.figures["memory_mb"] == 900.0


def test_memory_streak_resets_and_spec_memory_wins() -> None:
    sim = Sim(specs={"big": _spec("big", normal_memory=2048.0)})
    assert sim.step(_inst(cpu=10.0, memory=900.0)) == []
    assert sim.step(_inst(cpu=10.0, memory=50.0)) == []
    assert sim.step(_inst(cpu=10.0, memory=900.0)) == []
    for _ in range(5):
        assert sim.step(_inst("b-1", "big", cpu=10.0, memory=1500.0)) == []


def test_memory_and_cpu_over_together_is_a_kill_not_a_clamp() -> None:
    sim = Sim()
    sim.step(_inst(memory=900.0))
    assert _kinds(sim.step(_inst(memory=900.0))) == ["kill"]


# --- releases ------------------------------------------------------------------------------------


def test_clamp_is_released_after_a_quiet_cooldown() -> None:
    config = PolicyConfig(cooldown_s=30.0)
    sim = Sim(config)
    sim.clamp_hog()
    assert sim.step(_clamped(throttled=0.0, cpu=50.0)) == []  # first quiet interval
    quiet_since = sim.now
    while sim.now < quiet_since + 30 * SEC - SEC:
        assert sim.step(_clamped(throttled=0.0, cpu=50.0)) == []
    actions = sim.step(_clamped(throttled=0.0, cpu=50.0))
    assert sim.now == quiet_since + 30 * SEC
    assert len(actions) == 1
    release = actions[0]
    assert release.kind == "release-clamp"
    assert (release.node, release.incarnation, release.instance) == ("n1", "n1-inc", "hog-1")
    assert release.cpu_millis is None
    assert release.rule == "quiet for 30s under its clamp"
    # Released once; the instance is judged afresh afterwards (and may be clamped again).
    assert sim.step(_inst(cpu=50.0)) == []
    assert sim.step(_inst()) == []
    assert _kinds(sim.step(_inst())) == ["clamp"]


def test_pressing_during_the_cooldown_restarts_it() -> None:
    sim = Sim(PolicyConfig(cooldown_s=30.0))
    sim.clamp_hog()
    for _ in range(20):
        assert sim.step(_clamped(throttled=0.0, cpu=50.0)) == []
    assert sim.step(_clamped()) == []  # pressing once
    for _ in range(30):  # the first quiet interval starts the cool-down again, 29 s more
        assert sim.step(_clamped(throttled=0.0, cpu=50.0)) == []
    assert _kinds(sim.step(_clamped(throttled=0.0, cpu=50.0))) == ["release-clamp"]


def test_an_unapplied_clamp_is_not_quiet() -> None:
    """If the instance keeps reporting itself unclamped and far over its bound after the clamp (the
    Clamp command was lost or failed on the node), it is not "quiet for 30s under its clamp"."""
    sim = Sim(PolicyConfig(cooldown_s=30.0))
    sim.clamp_hog()
    for _ in range(60):
        assert "release-clamp" not in _kinds(sim.step(_inst()))


def _isolate(sim: Sim) -> Action:
    sim.clamp_hog()
    for _ in range(2):
        sim.step(_clamped())
    [isolate] = sim.step(_clamped())
    assert isolate.kind == "isolate"
    sim.overrides["hog"] = _override(until_ms=isolate.until_ms)
    return isolate


def test_isolation_is_released_after_the_cooldown() -> None:
    config = PolicyConfig(cooldown_s=30.0)
    sim = Sim(config)
    _isolate(sim)
    for _ in range(5):
        sim.step(_clamped())  # still bad where it runs: the cool-down has not begun
    last_bad = sim.now
    assert sim.throttler.releases(sim.overrides, last_bad + 29 * SEC) == []
    for _ in range(29):
        sim.step(_clamped(throttled=0.0, cpu=50.0))  # quiet now
        assert sim.throttler.releases(sim.overrides, sim.now) == []
    releases = sim.throttler.releases(sim.overrides, last_bad + 30 * SEC)
    assert len(releases) == 1
    assert releases[0].kind == "release-isolation"
    assert releases[0].function == "hog"
    assert releases[0].rule == "quiet for 30s"
    assert sim.throttler.releases(sim.overrides, last_bad + 60 * SEC) == []  # only once


def test_abnormal_new_instances_of_an_isolated_function_keep_it_isolated() -> None:
    sim = Sim(PolicyConfig(cooldown_s=30.0))
    _isolate(sim)
    # Drained and restarted on an isolation node, the function is still a hog there: clamped again,
    # and still pressing on its quota.
    sim.step(_inst("hog-2"))
    assert sim.throttler.releases(sim.overrides, sim.now) == []
    assert _kinds(sim.step(_inst("hog-2"))) == ["clamp"]
    for _ in range(40):
        assert sim.step(_clamped("hog-2")) == []  # the override is in force: no new isolation
        assert sim.throttler.releases(sim.overrides, sim.now) == []


def test_releases_skip_user_overrides() -> None:
    sim = Sim(PolicyConfig(cooldown_s=30.0))
    _isolate(sim)
    last_bad = sim.now
    sim.overrides["hog"] = _override(by="user")  # a user took the placement over since
    assert sim.throttler.releases(sim.overrides, last_bad + 30 * SEC) == []
    assert "hog" not in sim.throttler.isolated


def test_releases_skip_overrides_already_gone() -> None:
    sim = Sim(PolicyConfig(cooldown_s=30.0))
    _isolate(sim)
    last_bad = sim.now
    del sim.overrides["hog"]  # tombstoned (expired, or removed by hand)
    assert sim.throttler.releases(sim.overrides, last_bad + 30 * SEC) == []


def test_releases_ignore_isolations_the_throttler_did_not_make() -> None:
    throttler = Throttler(PolicyConfig())
    overrides = {"f": _override("f", by="throttler"), "g": _override("g", by="user")}
    assert throttler.releases(overrides, T0 + 3600 * SEC) == []


# --- forget --------------------------------------------------------------------------------------


def test_forget_drops_instances_not_seen_for_a_while() -> None:
    sim = Sim()
    sim.step(_inst("old"))
    seen_old = sim.now
    sim.step(_inst("new"), calm=False)
    assert {"old", "new"} <= set(sim.throttler.instances)
    sim.throttler.forget(seen_old + 60 * SEC)
    assert "old" in sim.throttler.instances  # exactly 60 s: kept
    sim.throttler.forget(seen_old + 60 * SEC + 1)
    assert "old" not in sim.throttler.instances
    assert "new" in sim.throttler.instances
    sim.throttler.forget(seen_old + 120 * SEC, older_than_s=10.0)
    assert sim.throttler.instances == {}


def test_a_forgotten_instance_starts_a_fresh_streak() -> None:
    sim = Sim()
    assert sim.step(_inst()) == []
    sim.throttler.forget(sim.now + 61 * SEC)
    assert sim.step(_inst()) == []  # its earlier interval over the bound is forgotten


# --- the timing --------------------------------------------------------------------------


def test_a_1000m_hog_is_clamped_within_2_and_isolated_within_5_intervals() -> None:
    """1 s interval, default PolicyConfig: the hog wants 1000m from interval 1; once clamped its quota is
    300m and it is throttled ~700ms per 1000ms. Clamp within 2 intervals, isolation within 5."""
    sim = Sim(PolicyConfig())
    clamped_to: int | None = None
    clamp_at: int | None = None
    isolate_at: int | None = None
    for _ in range(10):
        if clamped_to is None:
            hog = _inst(cpu=1000.0, throttled=0.0, quota=1000, clamped=False)
        else:
            hog = _inst(cpu=float(clamped_to), throttled=1000.0 - clamped_to, quota=clamped_to, clamped=True)
        for action in sim.step(hog):
            assert action.function == "hog"
            if action.kind == "clamp":
                assert clamp_at is None, "clamped twice"
                clamp_at, clamped_to = sim.interval, action.cpu_millis
            elif action.kind == "isolate":
                assert isolate_at is None, "isolated twice"
                isolate_at = sim.interval
                sim.overrides["hog"] = _override(until_ms=action.until_ms)
            else:
                raise AssertionError(f"unexpected {action}")
    assert clamped_to == 300
    assert clamp_at is not None and clamp_at <= 2
    assert isolate_at is not None and isolate_at <= 5
