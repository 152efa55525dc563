"""Unit tests of the node metrics' pressure figures: the agent's readers and the versioned event."""

from __future__ import annotations

from pathlib import Path

import pytest

from events import NodeMetrics
from events.codec import decode, encode
from events.metrics import NodeCpuPressure
from services.agent.cgroups import (
    HostPressure,
    V2InstanceCgroup,
    parse_load1,
    parse_procs_running,
    parse_psi,
    read_host_pressure,
)
from services.agent.node import node_pressure

PSI = "some avg10=30.04 avg60=21.03 avg300=20.42 total=697652538\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"


def test_psi_lines_are_parsed() -> None:
    assert parse_psi(PSI) == {"avg10": 30.04, "avg60": 21.03, "avg300": 20.42, "total": 697652538.0}
    assert parse_psi(PSI, "full")["avg10"] == 0.0
    assert parse_psi("") == {}


def test_run_queue_and_load_are_parsed() -> None:
    assert parse_procs_running("cpu  1 2 3\nprocs_running 5\nprocs_blocked 0\n") == 5
    assert parse_procs_running("cpu 1 2 3\n") is None
    assert parse_load1("2.62 1.90 1.51 3/412 9999\n") == 2.62


def _proc(tmp_path: Path, psi: bool) -> Path:
    (tmp_path / "stat").write_text("cpu  1 2 3\nprocs_running 4\n")
    (tmp_path / "loadavg").write_text("3.10 2.00 1.00 4/300 123\n")
    if psi:
        (tmp_path / "pressure").mkdir()
        (tmp_path / "pressure" / "cpu").write_text(PSI)
    return tmp_path


def test_a_host_with_psi_reports_psi_and_the_run_queue_without_the_reader(tmp_path: Path) -> None:
    host = read_host_pressure(_proc(tmp_path, psi=True), cores=2)
    assert host == HostPressure(cpu_some_avg10=30.04, procs_running=3, load1=3.10, cores=2)
    p = node_pressure(host)
    assert (p.source, p.cpu_some_avg10, p.procs_running, p.cores) == ("psi", 30.04, 3, 2)


def test_a_host_without_psi_falls_back_to_the_run_queue(tmp_path: Path) -> None:
    p = node_pressure(read_host_pressure(_proc(tmp_path, psi=False), cores=2))
    assert (p.source, p.cpu_some_avg10, p.procs_running, p.load1) == ("run queue", None, 3, 3.10)


def test_this_host_gives_some_reading() -> None:
    p = node_pressure(read_host_pressure())
    assert p.cores >= 1 and p.procs_running is not None  # /proc/stat is on every Linux host
    assert (p.source == "psi") == (p.cpu_some_avg10 is not None)


def _v2_group(path: Path, pressure: str | None) -> V2InstanceCgroup:
    path.mkdir()
    (path / "cpu.stat").write_text("usage_usec 5000\nnr_periods 10\nnr_throttled 3\nthrottled_usec 700\n")
    (path / "memory.current").write_text(str(64 * 2**20))
    (path / "pids.current").write_text("2")
    if pressure is not None:
        (path / "cpu.pressure").write_text(pressure)
    return V2InstanceCgroup(path, "inst-1")


def test_a_v2_instance_reports_the_time_its_tasks_waited(tmp_path: Path) -> None:
    stats = _v2_group(tmp_path / "with", "some avg10=1.00 avg60=0.50 avg300=0.10 total=2500\n").stats()
    assert stats.cpu_wait_ns == 2_500_000 and stats.nr_throttled == 3 and stats.cpu_throttled_ns == 700_000
    assert _v2_group(tmp_path / "without", None).stats().cpu_wait_ns is None


def test_node_metrics_with_pressure_round_trip_and_records_without_it_still_decode() -> None:
    pressure = NodeCpuPressure(source="run queue", procs_running=5, load1=3.0, cores=2)
    record = NodeMetrics(node="n", incarnation="i", interval_ms=1000, pressure=pressure)
    assert record.version == 1  # additive, defaulted fields: no new version for old readers to refuse
    back = decode(encode(record))
    assert isinstance(back, NodeMetrics) and back.pressure == pressure
    old = decode(
        b'{"type":"node.metrics","version":1,"node":"n","incarnation":"i","interval_ms":1000,'
        b'"instances":[{"instance":"a","function":"f","cpu_millis":5.0}]}'
    )
    assert isinstance(old, NodeMetrics) and old.version == 1 and old.pressure is None
    assert old.instances[0].cpu_wait_ms is None and old.instances[0].nr_throttled is None


def test_an_unknown_pressure_source_is_refused() -> None:
    with pytest.raises(ValueError):
        NodeCpuPressure(source="guess")  # type: ignore[arg-type]
