"""Unit tests of the throttler's per-function-per-node judgment, on recorded metric series of each shape.

Each series is what an agent publishes for one node, one interval (1 s) after another, next to a
well-behaved function (``victim``: a few ms of work, several calls a second). Pure decisions, no timing.
"""

from __future__ import annotations

from pathlib import Path

from events import InstanceMetrics, NodeMetrics
from events.metrics import NodeCpuPressure
from services.throttler.fairness import (
    FairnessConfig,
    NodeCapacity,
    NodePressure,
    judge_node,
    parse_procs_running,
    parse_psi_some_avg10,
    pressure_of,
    read_host_pressure,
    usage_by_function,
)
from services.throttler.policy import Action, PolicyConfig, Throttler

T0 = 1_700_000_000_000
SEC = 1000
BUSY = NodeCapacity(2000.0, 4096.0, pressure=NodePressure(cpu_some_pct=45.0, cores=2, source="psi"))
"""A 2-core node where work waits for a CPU 45% of the time."""
CALM = NodeCapacity(2000.0, 4096.0, pressure=NodePressure(cpu_some_pct=1.0, cores=2, source="psi"))
"""The same node with nothing waiting."""


def _m(
    instance: str,
    function: str,
    cpu: float,
    memory: float = 40.0,
    pids: int = 1,
    throttled: float = 0.0,
    quota: int | None = None,
    state: str = "busy",
) -> InstanceMetrics:
    return InstanceMetrics(
        instance=instance,
        function=function,
        state=state,
        cpu_millis=cpu,
        memory_mb=memory,
        pids=pids,
        throttled_ms=throttled,
        cpu_quota_millis=quota,
        clamped=quota is not None,
    )


def _victim() -> InstanceMetrics:
    return _m("victim-1", "victim", cpu=30.0, memory=35.0, state="busy")


class Replay:
    """Feeds a recorded series interval by interval; clamps take effect in the next interval's figures."""

    def __init__(self, node: NodeCapacity = BUSY) -> None:
        self.throttler = Throttler(PolicyConfig())
        self.node = node
        self.now = T0
        self.interval = 0
        self.quota: dict[str, int] = {}
        """instance -> clamped quota, as the agent would apply it."""
        self.log: list[tuple[int, Action]] = []

    def step(self, *instances: InstanceMetrics) -> list[Action]:
        self.interval += 1
        self.now += SEC
        record = NodeMetrics(node="runtime-0", incarnation="inc", interval_ms=1000, instances=list(instances))
        actions = self.throttler.observe(record, {}, {}, self.now, self.node)
        for a in actions:
            self.log.append((self.interval, a))
            if a.kind == "clamp" and a.instance is not None and a.cpu_millis is not None:
                self.quota[a.instance] = a.cpu_millis
        return actions

    def first(self, kind: str, function: str) -> int | None:
        return next((i for i, a in self.log if a.kind == kind and a.function == function), None)

    def held(self, instance: str, wants: float) -> tuple[float, float, int | None]:
        """(cpu, throttled ms, quota) of an instance that wants ``wants`` millicores under its clamp."""
        quota = self.quota.get(instance)
        if quota is None or wants <= quota:
            return wants, 0.0, quota
        return float(quota), 1000.0 * (wants - quota) / wants, quota


def _kinds(replay: Replay, function: str) -> list[str]:
    return [a.kind for _, a in replay.log if a.function == function]


# --- the shapes: clamped within 2 intervals, isolated within 5 -------------------------------------


def test_one_long_spinner_next_to_a_victim_is_clamped_then_isolated() -> None:
    r = Replay()
    for _ in range(8):
        cpu, throttled, quota = r.held("spin-1", 1000.0)
        r.step(_m("spin-1", "spin", cpu, throttled=throttled, quota=quota), _victim())
    clamp, isolate = r.first("clamp", "spin"), r.first("isolate", "spin")
    assert clamp is not None and clamp <= 2
    assert isolate is not None and isolate <= 5
    assert _kinds(r, "victim") == []
    [iso] = [a for _, a in r.log if a.kind == "isolate"]
    assert iso.figures["psi_cpu_some_pct"] == 45.0 and iso.figures["throttled_ms"] > 0  # the reason's figures


def test_many_short_concurrent_spinners_each_under_the_bound_are_caught_as_a_function() -> None:
    """Six at a time, each ~280m (under the 300m platform floor) and each living 2 s: no instance is
    ever an outlier, the function takes 1.7 of the node's 2 cores while the victim waits."""
    r = Replay()
    for t in range(8):
        spinners = []
        for k in range(6):
            iid = f"spin-{t // 2}-{k}"  # new instances every 2 intervals
            cpu, throttled, quota = r.held(iid, 280.0)
            spinners.append(_m(iid, "spin", cpu, throttled=throttled, quota=quota))
        r.step(*spinners, _victim())
    clamp, isolate = r.first("clamp", "spin"), r.first("isolate", "spin")
    assert clamp is not None and clamp <= 2
    assert isolate is not None and isolate <= 5
    first_clamp = next(a for _, a in r.log if a.kind == "clamp")
    # Under pressure, half of the 1710m the node's functions got, split over its 6 instances.
    assert "fair share 855m of 1710m" in first_clamp.rule and "psi cpu some 45%" in first_clamp.rule
    assert first_clamp.cpu_millis == 142
    assert first_clamp.figures["fn_cpu_millis"] == 1680.0 and first_clamp.figures["active_functions"] == 2.0
    # New instances of the clamped function get the same quota as they appear.
    later = [a for i, a in r.log if a.kind == "clamp" and i > clamp]
    assert later and all(a.cpu_millis == 142 for a in later)
    assert _kinds(r, "victim") == []


def test_a_memory_grower_is_killed_then_isolated_when_it_grows_again() -> None:
    r = Replay()
    sizes = [60.0, 160.0, 260.0, 60.0, 160.0, 260.0, 60.0]  # killed past its bound, comes back, grows again
    for t, size in enumerate(sizes):
        r.step(_m(f"grow-{t // 3}", "grow", 50.0, memory=size), _victim())
    kill, isolate = r.first("kill", "grow"), r.first("isolate", "grow")
    assert kill is not None and kill - 2 + 1 <= 2  # shows at interval 2, killed at its second interval over
    assert isolate is not None and isolate - 2 + 1 <= 5
    assert "again" in next(a.rule for _, a in r.log if a.kind == "isolate")


def test_a_fork_heavy_function_is_clamped_then_isolated_on_its_pids() -> None:
    r = Replay()
    for _ in range(8):
        cpu, throttled, quota = r.held("fork-1", 250.0)
        r.step(_m("fork-1", "fork", cpu, pids=150, throttled=throttled, quota=quota), _victim())
    clamp, isolate = r.first("clamp", "fork"), r.first("isolate", "fork")
    assert clamp is not None and clamp <= 2
    assert isolate is not None and isolate <= 5
    assert "150 pids over 64" in next(a.rule for _, a in r.log if a.kind == "clamp")


# --- no false positives ----------------------------------------------------------------------------


def test_a_steady_busy_function_alone_on_a_calm_node_is_never_isolated() -> None:
    r = Replay(CALM)
    for t in range(60):
        r.step(*(_m(f"batch-{k}", "batch", 700.0 + (t % 3) * 5) for k in range(2)))
    assert [a for _, a in r.log] == []


def test_a_lone_spinner_over_the_bound_is_left_alone_while_nothing_waits_and_clamped_once_work_waits() -> None:
    r = Replay(CALM)
    for _ in range(20):
        r.step(_m("spin-1", "spin", 1000.0))
    assert r.log == []
    r.node = BUSY  # others' work starts waiting for a CPU
    for _ in range(2):
        r.step(_m("spin-1", "spin", 1000.0))
    assert _kinds(r, "spin") == ["clamp"]


def test_many_spinners_next_to_a_victim_on_a_node_without_pressure_are_left_alone() -> None:
    r = Replay(CALM)
    for _ in range(20):
        r.step(*(_m(f"spin-{k}", "spin", 280.0) for k in range(6)), _victim())
    assert r.log == []


def test_a_short_burst_is_not_punished() -> None:
    r = Replay()
    r.step(*(_m(f"spin-{k}", "spin", 280.0) for k in range(6)), _m("big", "spin", 1000.0), _victim())
    for _ in range(20):
        r.step(_m("spin-0", "spin", 5.0, state="ready"), _victim())
    assert r.log == []


def test_a_clamped_function_back_within_its_share_is_released_after_the_cooldown() -> None:
    r = Replay()
    for _ in range(2):
        r.step(*(_m(f"spin-{k}", "spin", 280.0) for k in range(6)), _victim())
    assert r.first("clamp", "spin") == 2
    for _ in range(31):
        r.step(*(_m(f"spin-{k}", "spin", 20.0, quota=166, state="ready") for k in range(6)), _victim())
    assert _kinds(r, "spin").count("release-clamp") == 1 and "isolate" not in _kinds(r, "spin")


# --- the figures -----------------------------------------------------------------------------------


def test_usage_sums_a_functions_instances_and_skips_generic_ones() -> None:
    usage = usage_by_function(
        [
            _m("a", "f", 100.0, memory=10.0, pids=2, throttled=5.0),
            _m("b", "f", 50.0, memory=20.0, pids=3, quota=100, state="ready"),
            InstanceMetrics(instance="g", function=None, state="ready", cpu_millis=999.0),
        ]
    )
    f = usage["f"]
    assert (f.cpu_millis, f.memory_mb, f.pids, f.throttled_ms, f.busy) == (150.0, 30.0, 5, 5.0, 1)
    assert f.instances == ("a", "b") and f.unclamped == ("a",) and set(usage) == {"f"}


def test_pressure_from_psi_from_the_run_queue_or_from_saturation() -> None:
    record = NodeMetrics(node="n", incarnation="i", interval_ms=1000, instances=[_m("s", "spin", 1500.0), _victim()])
    cfg = FairnessConfig()
    run_queue = NodeCapacity(2000.0, pressure=NodePressure(runnable=5, cores=2, source="run queue"))
    assert judge_node(record, run_queue, cfg)["spin"].pressure is True
    short_queue = NodeCapacity(2000.0, pressure=NodePressure(runnable=2, cores=2, source="run queue"))
    assert judge_node(record, short_queue, cfg)["spin"].pressure is False
    assert judge_node(record, NodeCapacity(2000.0), cfg)["spin"].pressure is None  # 1530m of 2000m: unknown
    assert judge_node(record, NodeCapacity(1600.0), cfg)["spin"].pressure is True  # saturated
    alone = judge_node(
        NodeMetrics(node="n", incarnation="i", interval_ms=1000, instances=[_m("s", "spin", 1500.0)]), BUSY, cfg
    )["spin"]
    assert alone.others_active == () and alone.busy_alone and not alone.hurting_others


def test_proc_files_are_parsed(tmp_path: Path) -> None:
    psi = "some avg10=12.50 avg60=3.00 avg300=1.00 total=123\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    assert parse_psi_some_avg10(psi) == 12.5
    assert parse_psi_some_avg10("") is None
    stat = "cpu  1 2 3\nctxt 99\nprocs_running 7\nprocs_blocked 0\n"
    assert parse_procs_running(stat) == 7
    (tmp_path / "pressure").mkdir()
    (tmp_path / "pressure" / "cpu").write_text(psi)
    (tmp_path / "stat").write_text(stat)
    assert read_host_pressure(tmp_path, cores=2) == NodePressure(12.5, 7, 2, "psi")
    (tmp_path / "pressure" / "cpu").unlink()  # a v1 host without PSI: the run queue
    assert read_host_pressure(tmp_path, cores=2) == NodePressure(None, 7, 2, "run queue")


# --- pressure carried by the node metrics themselves (the agent's reading) --------------------------


class CarriedReplay(Replay):
    """Like :class:`Replay`, but each interval's pressure comes with the record, as the agent sends it,
    and the throttler reads it with :func:`pressure_of` (as its service does)."""

    def __init__(self, pressures: list[NodeCpuPressure]) -> None:
        super().__init__(NodeCapacity(2000.0, 4096.0))
        self.pressures = pressures

    def step(self, *instances: InstanceMetrics) -> list[Action]:
        self.interval += 1
        self.now += SEC
        record = NodeMetrics(
            node="runtime-0",
            incarnation="inc",
            interval_ms=1000,
            instances=list(instances),
            pressure=self.pressures[min(self.interval, len(self.pressures)) - 1],
        )
        node = NodeCapacity(2000.0, 4096.0, pressure=pressure_of(record))
        actions = self.throttler.observe(record, {}, {}, self.now, node)
        for a in actions:
            self.log.append((self.interval, a))
            if a.kind == "clamp" and a.instance is not None and a.cpu_millis is not None:
                self.quota[a.instance] = a.cpu_millis
        return actions


V1_WAITING = NodeCpuPressure(source="run queue", procs_running=5, load1=3.4, cores=2)
"""A cgroup v1 node (no PSI): five runnable tasks on two cores."""
V1_CALM = NodeCpuPressure(source="run queue", procs_running=2, load1=1.9, cores=2)
"""The same node busy, each core with its one task and nobody waiting."""


def test_pressure_of_reads_what_the_agent_sent_and_nothing_from_an_older_agent() -> None:
    record = NodeMetrics(node="n", incarnation="i", interval_ms=1000, pressure=V1_WAITING)
    assert pressure_of(record) == NodePressure(None, 5, 2, "run queue")
    psi = NodeCpuPressure(source="psi", cpu_some_avg10=12.5, procs_running=1, cores=2)
    assert pressure_of(NodeMetrics(node="n", incarnation="i", interval_ms=1000, pressure=psi)) == NodePressure(
        12.5, 1, 2, "psi"
    )
    assert pressure_of(NodeMetrics(node="n", incarnation="i", interval_ms=1000)) is None


def test_on_a_v1_node_a_spinner_next_to_a_waiting_victim_is_clamped_then_isolated_on_the_run_queue() -> None:
    r = CarriedReplay([V1_WAITING])
    victim = InstanceMetrics(
        instance="victim-1", function="victim", state="busy", cpu_millis=30.0, memory_mb=35.0, nr_throttled=0
    )
    for _ in range(8):
        cpu, throttled, quota = r.held("spin-1", 1000.0)
        r.step(_m("spin-1", "spin", cpu, throttled=throttled, quota=quota), victim)
    clamp, isolate = r.first("clamp", "spin"), r.first("isolate", "spin")
    assert clamp is not None and clamp <= 2 and isolate is not None and isolate <= 5
    [iso] = [a for _, a in r.log if a.kind == "isolate"]
    assert iso.figures["runnable"] == 5.0 and iso.figures["cores"] == 2.0
    assert _kinds(r, "victim") == []


def test_on_a_v1_node_a_steady_busy_function_alone_with_nobody_waiting_is_never_touched() -> None:
    r = CarriedReplay([V1_CALM])
    for t in range(60):
        r.step(*(_m(f"batch-{k}", "batch", 950.0 + (t % 3) * 5) for k in range(2)))
    assert r.log == []


def test_busy_next_to_a_victim_with_nobody_waiting_is_not_hurting_it() -> None:
    """Two cores, a 950m function and a victim: the run queue shows each task has its core."""
    r = CarriedReplay([V1_CALM])
    for _ in range(30):
        r.step(_m("batch-1", "batch", 950.0), _victim())
    assert r.log == []


def test_a_one_interval_burst_with_a_long_run_queue_is_not_punished() -> None:
    r = CarriedReplay([V1_WAITING, V1_CALM])  # the queue is long only in the burst's interval
    r.step(*(_m(f"spin-{k}", "spin", 280.0) for k in range(6)), _m("big", "spin", 1000.0), _victim())
    for _ in range(20):
        r.step(_m("spin-0", "spin", 5.0, state="ready"), _victim())
    assert r.log == []


def test_the_instances_wait_times_are_in_the_decisions_figures() -> None:
    r = Replay()
    waiting = InstanceMetrics(instance="victim-1", function="victim", state="busy", cpu_millis=30.0, cpu_wait_ms=400.0)
    for _ in range(3):
        r.step(
            InstanceMetrics(
                instance="spin-1", function="spin", state="busy", cpu_millis=280.0, cpu_wait_ms=50.0, nr_throttled=0
            ),
            *(_m(f"spin-{k}", "spin", 280.0) for k in range(2, 7)),
            waiting,
        )
    clamp = next(a for _, a in r.log if a.kind == "clamp")
    assert clamp.figures["others_cpu_wait_ms"] == 400.0 and clamp.figures["fn_cpu_wait_ms"] == 50.0


# --- an isolated function carries its clamp to nodes under pressure ---------------------------------


def _isolate_spinners(r: Replay) -> None:
    for t in range(8):
        spinners = []
        for k in range(4):
            iid = f"spin-{t}-{k}"
            cpu, throttled, quota = r.held(iid, 240.0)
            spinners.append(_m(iid, "spin", cpu, throttled=throttled, quota=quota))
        r.step(*spinners, _victim())
    assert r.first("isolate", "spin") is not None


def _on_isolation_node(r: Replay, node: NodeCapacity, intervals: int) -> list[Action]:
    out: list[Action] = []
    r.node = node
    for _ in range(intervals):
        r.interval += 1
        r.now += SEC
        record = NodeMetrics(
            node="isolation-0",
            incarnation="inc-iso",
            interval_ms=1000,
            instances=[_m(f"iso-{k}", "spin", 240.0, quota=r.quota.get(f"iso-{k}")) for k in range(4)],
        )
        acts = r.throttler.observe(record, {}, {}, r.now, node)
        for a in acts:
            if a.kind == "clamp" and a.instance is not None and a.cpu_millis is not None:
                r.quota[a.instance] = a.cpu_millis
        out.extend(acts)
    return out


def test_an_isolated_function_is_clamped_again_on_an_isolation_node_where_work_waits() -> None:
    """An isolation node on the same host's cores (an embedded platform): the victims still wait there."""
    r = Replay()
    _isolate_spinners(r)
    [iso] = [a for _, a in r.log if a.kind == "isolate"]
    carried = int(iso.figures["carried_quota_millis"])
    acts = _on_isolation_node(r, BUSY, 2)
    clamps = [a for a in acts if a.kind == "clamp" and a.instance is not None]
    assert sorted(a.instance or "" for a in clamps) == [f"iso-{k}" for k in range(4)]
    assert all(a.cpu_millis == carried and a.node == "isolation-0" for a in clamps)
    assert "isolated, and work waits" in clamps[0].rule and clamps[0].figures["psi_cpu_some_pct"] == 45.0
    # Once per node, for the function as a whole: the instances it starts there begin clamped.
    [whole] = [a for a in acts if a.kind == "clamp" and a.instance is None]
    assert (whole.function, whole.node, whole.incarnation, whole.cpu_millis) == (
        "spin",
        "isolation-0",
        "inc-iso",
        carried,
    )
    assert "new ones included" in whole.rule


def test_the_end_of_an_isolation_lifts_the_clamp_its_nodes_start_instances_with() -> None:
    r = Replay()
    _isolate_spinners(r)
    _on_isolation_node(r, BUSY, 2)
    r.now += 60 * SEC  # quiet for longer than the cool-down
    [release] = [a for a in r.throttler.releases({}, r.now) if a.node == "isolation-0"]
    assert (release.kind, release.function, release.node, release.incarnation, release.instance) == (
        "release-clamp",
        "spin",
        "isolation-0",
        "inc-iso",
        None,
    )
    assert r.throttler.releases({}, r.now + SEC) == []


def test_an_isolated_function_runs_free_on_a_calm_isolation_node() -> None:
    r = Replay()
    _isolate_spinners(r)
    assert [a for a in _on_isolation_node(r, CALM, 5) if a.kind == "clamp"] == []


def test_a_released_isolation_carries_no_clamp() -> None:
    r = Replay()
    _isolate_spinners(r)
    r.now += 60 * SEC  # quiet for longer than the cool-down
    released = r.throttler.releases({}, r.now)
    # No override by the throttler seen: nothing to send about the placement; the clamp its
    # nodes were told to start instances with is lifted.
    assert {a.kind for a in released} <= {"release-clamp"} and all(a.instance is None for a in released)
    assert "spin" not in r.throttler.isolation_quota
    assert [a for a in _on_isolation_node(r, BUSY, 3) if a.kind == "clamp"] == []
