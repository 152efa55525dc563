"""Idle cost: what the platform burns while nothing is invoked.

    python -m loadtest idle [--seconds 60] [--settle 30]

Starts the whole embedded platform (broker included; or measures a running one, see
``loadtest.harness``), waits until it is up and has settled, then for ``--seconds`` reads the CPU
time (utime + stime, ``/proc/<pid>/stat``) of every platform process: each component found through
its pid file in ``<home>/run/`` and, separately, everything under it in the process tree (an agent's
zygote and instances). The figure is % of one core over the window. Next to it: the established TCP
connections to the broker's port, per component (client sockets matched to processes through
``/proc/<pid>/fd``), and the busiest threads (``/proc/<pid>/task``), which say *what* spins.

Target: the idle platform costs at most 10% of one core in total.

The broker's JIT compiler works for minutes after a start, driven by the clients' requests (the
``C2 CompilerThread`` row of the busiest threads): with a short ``--settle`` it is a good part of
the broker's figure; ``--settle 150`` measures closer to a platform idle for hours.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from loadtest import harness
from loadtest.harness import console, fmt
from services.common.settings import CommonSettings

TARGET_PCT = 10.0
"""The idle platform's budget, in % of one core."""
CLK_TCK = os.sysconf("SC_CLK_TCK")
TCP_ESTABLISHED = "01"


@dataclass
class Usage:
    """CPU ticks seen of one process over the window: first and last reading."""

    first: int
    last: int
    comm: str
    threads: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict)
    """(tid, name) -> (first, last) ticks."""

    @property
    def ticks(self) -> int:
        return self.last - self.first


def stat_of(path: Path) -> tuple[str, int, int] | None:
    """(comm, ppid, utime + stime) of one ``/proc/.../stat``; None if it is gone."""
    try:
        text = path.read_text()
    except OSError:
        return None
    head, _, rest = text.rpartition(")")
    comm = head.split("(", 1)[1] if "(" in head else ""
    fields = rest.split()
    # After the comm: state ppid ... utime is field 14 of the whole line, 12th after the comm.
    return comm, int(fields[1]), int(fields[11]) + int(fields[12])


def process_table(proc: Path = Path("/proc")) -> dict[int, tuple[str, int, int]]:
    """Every process: pid -> (comm, ppid, ticks)."""
    out: dict[int, tuple[str, int, int]] = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            stat = stat_of(entry / "stat")
            if stat is not None:
                out[int(entry.name)] = stat
    return out


def descendants(roots: Mapping[str, int], table: Mapping[int, tuple[str, int, int]]) -> dict[int, str]:
    """pid -> owning component for every process at or under a component's pid.

    A root's own pid is owned by ``name``; its descendants by ``name + "/children"``, down to the
    next component (a supervisor's children are components of their own).
    """
    children: dict[int, list[int]] = {}
    for pid, (_comm, ppid, _ticks) in table.items():
        children.setdefault(ppid, []).append(pid)
    owner = {root: name for name, root in roots.items() if root in table}
    for name, root in roots.items():
        stack = list(children.get(root, [])) if root in table else []
        while stack:
            pid = stack.pop()
            if pid in owner:
                continue  # another component (one a supervisor started), or seen already
            owner[pid] = f"{name}/children"
            stack.extend(children.get(pid, []))
    return owner


def component_pids(run_dir: Path) -> dict[str, int]:
    """Each component's pid, from ``<home>/run/<name>.pid``, and the supervisor's (``run/supervisor/pid``)."""
    found: dict[str, int] = {}
    for name, path in [(p.stem, p) for p in sorted(run_dir.glob("*.pid"))] + [
        ("supervisor", run_dir / "supervisor" / "pid")
    ]:
        try:
            found[name] = int(path.read_text().strip())
        except (OSError, ValueError):
            continue
    return found


def thread_ticks(pid: int) -> dict[tuple[int, str], int]:
    out: dict[tuple[int, str], int] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        stat = stat_of(task / "stat")
        if stat is not None:
            out[(int(task.name), stat[0])] = stat[2]
    return out


class Sampler:
    """Reads the platform's processes again and again; a process seen first mid-window counts from 0."""

    def __init__(self, run_dir: Path, extra_roots: Mapping[str, int] | None = None) -> None:
        self.run_dir = run_dir
        self.extra_roots = dict(extra_roots or {})
        """More processes to count, by name (with their children), next to the platform's components."""
        self.usage: dict[int, Usage] = {}
        self.owner: dict[int, str] = {}
        self._started = False

    def sample(self) -> None:
        table = process_table()
        owner = descendants({**component_pids(self.run_dir), **self.extra_roots}, table)
        for pid, name in owner.items():
            comm, _ppid, ticks = table[pid]
            threads = thread_ticks(pid)
            usage = self.usage.get(pid)
            if usage is None:
                base = ticks if not self._started else 0
                usage = self.usage[pid] = Usage(first=base, last=ticks, comm=comm)
                for key, t in threads.items():
                    usage.threads[key] = (t if not self._started else 0, t)
            usage.last = ticks
            for key, t in threads.items():
                first, _ = usage.threads.get(key, (0, 0))
                usage.threads[key] = (first, t)
            self.owner[pid] = name
        self._started = True

    def per_component(self, seconds: float) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for pid, usage in self.usage.items():
            entry = out.setdefault(self.owner[pid], {"pct": 0.0, "processes": 0})
            entry["pct"] += pct(usage.ticks, seconds)
            entry["processes"] += 1
        return dict(sorted(out.items()))

    def busiest_threads(self, seconds: float, n: int = 40) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = [
            {"component": self.owner[pid], "thread": name, "tid": tid, "pct": pct(last - first, seconds)}
            for pid, usage in self.usage.items()
            for (tid, name), (first, last) in usage.threads.items()
            if last > first
        ]
        return sorted(rows, key=lambda r: -r["pct"])[:n]


def pct(ticks: int, seconds: float) -> float:
    return 100.0 * ticks / CLK_TCK / seconds if seconds > 0 else 0.0


def parse_tcp(text: str) -> list[tuple[int, int, str, int]]:
    """``/proc/net/tcp`` rows: (local port, remote port, state, inode)."""
    rows = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 10:
            continue
        local, remote, state, inode = parts[1], parts[2], parts[3], parts[9]
        rows.append((int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state, int(inode)))
    return rows


def tcp_rows() -> list[tuple[int, int, str, int]]:
    rows: list[tuple[int, int, str, int]] = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows += parse_tcp(Path(name).read_text())
        except OSError:
            continue
    return rows


def socket_inodes(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def broker_connections(port: int, owner: Mapping[int, str]) -> tuple[int, dict[str, int]]:
    """Established connections to ``port`` (server side), and the client ends per component."""
    rows = tcp_rows()
    total = sum(1 for local, _remote, state, _ in rows if local == port and state == TCP_ESTABLISHED)
    clients = {inode for _local, remote, state, inode in rows if remote == port and state == TCP_ESTABLISHED}
    per: dict[str, int] = {}
    for pid, name in owner.items():
        n = len(socket_inodes(pid) & clients)
        if n:
            key = name.removesuffix("/children")
            per[key] = per.get(key, 0) + n
    return total, dict(sorted(per.items()))


def summarise(per_component: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Total, broker, and the rest grouped as services / agents / instances."""
    groups = {
        "total": 0.0,
        "broker": 0.0,
        "services": 0.0,
        "agents": 0.0,
        "instances (zygotes, pools)": 0.0,
        "supervisor": 0.0,
    }
    for name, entry in per_component.items():
        value = float(entry["pct"])
        groups["total"] += value
        if name.startswith("broker"):
            groups["broker"] += value
        elif name.endswith("/children"):
            groups["instances (zygotes, pools)"] += value
        elif name.startswith("agent-"):
            groups["agents"] += value
        elif name == "supervisor":
            groups["supervisor"] += value
        else:
            groups["services"] += value
    return groups


def measure(settings: CommonSettings, seconds: float, step_s: float = 1.0) -> dict[str, Any]:
    sampler = Sampler(settings.run_dir)
    port = int(settings.bootstrap.rpartition(":")[2])
    sampler.sample()
    conns_before, _ = broker_connections(port, sampler.owner)
    started = time.monotonic()
    with harness.progress() as bars:
        task = bars.add_task(f"idle for {seconds:.0f}s", total=int(seconds))
        while (elapsed := time.monotonic() - started) < seconds:
            time.sleep(min(step_s, seconds - elapsed))
            sampler.sample()
            bars.update(task, completed=int(time.monotonic() - started))
    took = time.monotonic() - started
    conns, per_conn = broker_connections(port, sampler.owner)
    per = sampler.per_component(took)
    return {
        "seconds": round(took, 2),
        "cpu_pct_of_one_core": summarise(per),
        "per_component": per,
        "busiest_threads": sampler.busiest_threads(took),
        "broker_connections": conns,
        "broker_connections_at_start": conns_before,
        "broker_connections_per_component": per_conn,
    }


def print_tables(result: Mapping[str, Any]) -> None:
    totals = result["cpu_pct_of_one_core"]
    table = Table("component", "processes", "% of one core", "broker connections", title="Idle platform")
    conns = result["broker_connections_per_component"]
    for name, entry in result["per_component"].items():
        conn = "" if name.endswith("/children") else fmt(conns.get(name, 0))
        table.add_row(name, fmt(entry["processes"]), fmt(entry["pct"]), conn)
    table.add_section()
    for name, value in totals.items():
        if name != "total":
            table.add_row(name, "", fmt(value), "")
    verdict = "meets" if totals["total"] <= TARGET_PCT else "misses"
    table.add_row(
        f"total ({verdict} the {TARGET_PCT:g}% target)", "", fmt(totals["total"]), fmt(result["broker_connections"])
    )
    console.print(table)
    threads = Table("component", "thread", "% of one core", title="Busiest threads")
    for row in result["busiest_threads"][:12]:
        threads.add_row(row["component"], row["thread"], fmt(row["pct"]))
    console.print(threads)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the measured window")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds to wait after the platform is up")
    harness.add_common_args(parser)
    args = parser.parse_args(None if argv is None else list(argv))
    report = harness.new_report("idle", args, {"seconds": args.seconds, "settle": args.settle})
    with harness.target(args) as where:
        report["platform"] = where.describe()
        with console.status(f"letting the platform settle for {args.settle:g}s"):
            time.sleep(args.settle)
        result = measure(where.settings, args.seconds)
    report.update(result)
    report["target_pct"] = TARGET_PCT
    report["meets_target"] = result["cpu_pct_of_one_core"]["total"] <= TARGET_PCT
    print_tables(result)
    harness.save(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
