"""Per-instance resource control with Linux cgroups (v1 and v2), standard library only.

The node agent runs every function instance as a local child process. The cgroup is the primary
resource boundary for it (rlimits in :mod:`services.agent.sandbox` are only a second line of
defence): CPU quota, memory limit without swap, a process-count limit, accounting (usage,
throttling, OOM kills) and a reliable "kill everything this instance started", which a process
group cannot give (a child may ``setsid()`` away from its group, but not leave its cgroup).

Layout, under the cgroup this agent itself lives in (so that a containerised or systemd-delegated
agent stays inside what it was given)::

    <own group>/stoker/<node>/<instance_id>

* cgroup v2 (production nodes): one tree; ``cpu``, ``memory`` and ``pids`` are enabled in
  ``cgroup.subtree_control`` of ``<own group>``, ``stoker`` and ``stoker/<node>``.
* cgroup v1 (hybrid/legacy hosts): one such tree per controller hierarchy (``cpu``, ``cpuacct``,
  ``memory``, ``pids``; ``cpu,cpuacct`` may be one co-mounted hierarchy), each below our own
  group *in that hierarchy* as read from ``/proc/self/cgroup``.

Typical use (see :func:`detect` and the module :mod:`services.agent.sandbox`)::

    driver = detect(node="runtime-0")
    driver.cleanup_leftovers()                 # after a crash: kill + remove old instances
    cg = driver.create(iid, Limits(cpu_millis=500, memory_mb=256, pids_max=64))
    ... spawn the child so that it joins cg.procs_paths before exec ...
    cg.kill_all(); cg.remove()
"""

from __future__ import annotations

import errno
import os
import re
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CgroupBusy",
    "CgroupDriver",
    "CgroupError",
    "CgroupStats",
    "CgroupUnavailable",
    "InstanceCgroup",
    "Limits",
    "V1Driver",
    "V1InstanceCgroup",
    "V2Driver",
    "V2InstanceCgroup",
    "cleanup_leftovers",
    "detect",
    "oom_killed",
]

DEFAULT_ROOT = "/sys/fs/cgroup"
ROOT_ENV = "STOKER_CGROUP_ROOT"
DEFAULT_PREFIX = "stoker"
DEFAULT_CPU_PERIOD_US = 100_000
# The kernel refuses CFS quotas below 1 ms per period (EINVAL), so tiny millicore values are clamped.
MIN_CPU_QUOTA_US = 1_000

V2_CONTROLLERS: tuple[str, ...] = ("cpu", "memory", "pids")
# cpuacct is required on v1 because it is the only place the CPU *usage* counter lives there.
V1_CONTROLLERS: tuple[str, ...] = ("cpu", "cpuacct", "memory", "pids")

# Instance ids and node names become directory names next to the kernel's control files
# ("memory.max", "tasks", ...): keep them to a plain charset, and refuse names that could
# collide with a control file (those start with a controller prefix and a dot).
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
_RESERVED_PREFIXES = frozenset(
    {
        "cgroup",
        "cpu",
        "cpuacct",
        "cpuset",
        "memory",
        "pids",
        "io",
        "blkio",
        "devices",
        "freezer",
        "hugetlb",
        "net_cls",
        "net_prio",
        "perf_event",
        "rdma",
        "misc",
    }
)
_RESERVED_NAMES = frozenset({"tasks", "notify_on_release", "release_agent"})

_POLL_S = 0.01


class CgroupError(Exception):
    """A cgroup operation failed (message names the file and the reason)."""


class CgroupUnavailable(CgroupError):
    """Cgroups cannot be used on this host/container; the message says why."""


class CgroupBusy(CgroupError):
    """The group still has processes (or could not be emptied in time)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one instance; ``None`` means unlimited.

    ``cpu_millis`` is in millicores (1000 = one full CPU), ``memory_mb`` in MiB (RAM, no swap),
    ``pids_max`` counts processes *and* threads (the pids controller counts tasks).
    """

    cpu_millis: int | None = None
    memory_mb: int | None = None
    pids_max: int | None = None

    def __post_init__(self) -> None:
        for name in ("cpu_millis", "memory_mb", "pids_max"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"Limits.{name} must be a positive int or None, not {value!r}")


@dataclass(frozen=True)
class CgroupStats:
    """Counters of one instance group, normalised across cgroup versions (ns and bytes)."""

    cpu_usage_ns: int
    memory_bytes: int
    memory_peak_bytes: int | None
    """v1 ``memory.max_usage_in_bytes``; v2 ``memory.peak`` (kernel >= 5.19, else None)."""
    pids: int
    cpu_throttled_ns: int
    nr_throttled: int
    oom_kills: int
    """OOM kills in the group; on old v1 kernels without ``oom_kill`` it is ``memory.failcnt``."""
    cpu_wait_ns: int | None = None
    """v2 ``cpu.pressure`` ``some`` total: time a task of the group waited for a CPU; ``None`` on
    v1 and on v2 kernels without PSI."""


@dataclass(frozen=True)
class HostPressure:
    """The host's CPU pressure: PSI where the kernel has it, the run queue and load always."""

    cpu_some_avg10: float | None
    """``some avg10`` of ``/proc/pressure/cpu`` (0..100), ``None`` without PSI."""
    procs_running: int | None
    """``procs_running`` of ``/proc/stat`` less the reader itself."""
    load1: float | None
    cores: int


def parse_psi(text: str, line: str = "some") -> dict[str, float]:
    """The ``some`` (or ``full``) line of a PSI file as ``{"avg10": .., "avg60": .., "avg300": .., "total": ..}``."""
    for row in text.splitlines():
        if row.startswith(line + " "):
            out: dict[str, float] = {}
            for part in row.split()[1:]:
                key, _, value = part.partition("=")
                try:
                    out[key] = float(value)
                except ValueError:
                    continue
            return out
    return {}


def parse_procs_running(text: str) -> int | None:
    """``procs_running`` of ``/proc/stat``, or None."""
    for row in text.splitlines():
        if row.startswith("procs_running "):
            return int(row.split()[1])
    return None


def parse_load1(text: str) -> float | None:
    """The one-minute load average of ``/proc/loadavg``, or None."""
    first = text.split(maxsplit=1)
    return float(first[0]) if first else None


def read_host_pressure(proc: Path = Path("/proc"), cores: int | None = None) -> HostPressure:
    """This host's CPU pressure. ``/proc/pressure/cpu`` exists on kernels with PSI whatever the
    cgroup version (an open fails with EOPNOTSUPP when booted with ``psi=0``); the run queue and
    load are there everywhere."""
    psi: float | None = None
    try:
        psi = parse_psi(_read_text(proc / "pressure" / "cpu")).get("avg10")
    except (OSError, CgroupError):
        pass
    running: int | None = None
    try:
        raw = parse_procs_running(_read_text(proc / "stat"))
        # The reading thread is itself running when it reads: count the others.
        running = None if raw is None else max(0, raw - 1)
    except (OSError, CgroupError):
        pass
    load: float | None = None
    try:
        load = parse_load1(_read_text(proc / "loadavg"))
    except (OSError, ValueError, CgroupError):
        pass
    return HostPressure(psi, running, load, cores or os.cpu_count() or 1)


# --------------------------------------------------------------------------- small file helpers


def _check_name(kind: str, name: str) -> str:
    looks_like_control_file = "." in name and name.split(".", 1)[0] in _RESERVED_PREFIXES
    if not _NAME_RE.match(name) or name in _RESERVED_NAMES or looks_like_control_file:
        raise ValueError(f"{kind} {name!r} is not usable as a cgroup name (use [A-Za-z0-9_.-], no control-file prefix)")
    return name


def _write(path: Path, value: str) -> None:
    """Write one value to a control file; errors name the file (the kernel's own are terse)."""
    try:
        # One write() per value: cgroup files parse each write separately, buffering could split it.
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise CgroupError(f"writing {value!r} to {path} failed: {exc.strerror or exc}") from exc


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise CgroupError(f"reading {path} failed: {exc.strerror or exc}") from exc


def _read_int(path: Path, default: int | None = None) -> int:
    """Read a single-number file; a missing optional file gives ``default``."""
    if default is not None and not path.exists():
        return default
    raw = _read_text(path).strip()
    return -1 if raw == "max" else int(raw)


def _read_keyed(path: Path, missing_ok: bool = True) -> dict[str, int]:
    """Parse ``key value`` lines (cpu.stat, memory.events, memory.oom_control...)."""
    if missing_ok and not path.exists():
        return {}
    out: dict[str, int] = {}
    for line in _read_text(path).splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            continue  # e.g. a non-numeric field added by a newer kernel
    return out


def _read_pids(procs: Path) -> list[int]:
    try:
        return [int(p) for p in procs.read_text().split()]
    except FileNotFoundError:
        return []


def _procs_recursive(group: Path) -> set[int]:
    """Pids in the group and any sub-groups (a workload may have made some if it was delegated)."""
    pids: set[int] = set()
    for dirpath, _dirnames, _files in os.walk(group):
        pids.update(_read_pids(Path(dirpath) / "cgroup.procs"))
    return pids


def _kill_pids(pids: Iterable[int], procs_files: list[Path]) -> None:
    """SIGKILL pids read from cgroup.procs without hitting a recycled pid.

    A pid read from cgroup.procs may exit and be reused by an unrelated process before we signal
    it (pid_max is often 32768). A pidfd pins the process itself: after opening pidfds we re-read
    the group, and only signal processes that are still in it.
    """
    pidfds: dict[int, int] = {}
    for pid in pids:
        try:
            pidfds[pid] = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        except OSError:  # pidfd not supported (kernel < 5.3): plain kill, accepting the tiny race
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        still: set[int] = set()
        for procs in procs_files:
            still.update(_procs_recursive(procs.parent))
        for pid, fd in pidfds.items():
            if pid in still:
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    finally:
        for fd in pidfds.values():
            os.close(fd)


def _rmdir_tree(group: Path, timeout_s: float) -> None:
    """rmdir a group and its sub-groups bottom-up, retrying while the kernel still frees tasks."""
    if not group.exists():
        return
    dirs = [Path(d) for d, _, _ in os.walk(group)]
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                # EBUSY: exiting tasks not yet detached (mostly v2); retry briefly.
                if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                    raise CgroupBusy(f"cannot remove {d}: {exc.strerror}") from exc
                time.sleep(_POLL_S)


def _unescape_mount(path: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


@dataclass(frozen=True)
class _Mount:
    root: str  # path inside the cgroup fs that is mounted (not "/" in containers without cgroupns)
    mountpoint: Path
    fstype: str
    options: frozenset[str]


def _cgroup_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[_Mount]:
    mounts = []
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            lf, rf = left.split(), right.split()
            if len(rf) < 3 or rf[0] not in ("cgroup", "cgroup2"):
                continue
            mounts.append(
                _Mount(
                    root=_unescape_mount(lf[3]),
                    mountpoint=Path(_unescape_mount(lf[4])),
                    fstype=rf[0],
                    options=frozenset(rf[2].split(",")),
                )
            )
    return mounts


def _own_cgroups(proc_cgroup: str = "/proc/self/cgroup") -> dict[str, str]:
    """controller -> our path in its hierarchy ("" key = the v2 unified hierarchy)."""
    own: dict[str, str] = {}
    with open(proc_cgroup) as f:
        for line in f:
            _hid, controllers, path = line.rstrip("\n").split(":", 2)
            if not controllers:
                own[""] = path
            for c in controllers.split(","):
                own[c] = path
    return own


def _below_mount(mount: _Mount, own_path: str | None) -> Path:
    """Directory of our own group in a mounted hierarchy.

    /proc/self/cgroup is relative to the cgroup-namespace root, mountinfo's root field too: in a
    container without a cgroup namespace both say /docker/<id>, so the mount point already *is*
    our group. When our path is outside what is mounted (e.g. "/.."), fall back to the mount point.
    """
    if own_path is None:
        return mount.mountpoint
    root = mount.root.rstrip("/")
    if own_path == root or own_path.startswith(root + "/"):
        rel = own_path[len(root) :].strip("/")
        return mount.mountpoint / rel if rel else mount.mountpoint
    return mount.mountpoint


def _is_under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


# --------------------------------------------------------------------------- instance groups


class InstanceCgroup(ABC):
    """The cgroup of one function instance (one directory on v2, one per hierarchy on v1)."""

    version: int

    def __init__(self, instance_id: str, cpu_period_us: int) -> None:
        self.instance_id = instance_id
        self.cpu_period_us = cpu_period_us
        self._pids_events_fd: int | None = None
        self._pids_events_lock = threading.Lock()  # remove() runs in a worker thread

    @property
    @abstractmethod
    def paths(self) -> list[Path]:
        """Every directory of this group (rmdir'd by :meth:`remove`)."""

    @property
    def procs_paths(self) -> list[str]:
        """The ``cgroup.procs`` files a process must be written to, to join the group.

        Pass these to :func:`services.agent.sandbox.join_cgroup_in_child` (no-gap join).
        """
        return [str(p / "cgroup.procs") for p in self.paths]

    def exists(self) -> bool:
        return any(p.is_dir() for p in self.paths)

    def add_pid(self, pid: int) -> None:
        """Move a running process into the group (parent-side join: it ran outside until now).

        Memory charged before the move stays with the old group on v1 (and v2): prefer the
        child joining itself before exec.
        """
        for procs in self.procs_paths:
            _write(Path(procs), str(pid))

    def pids(self) -> list[int]:
        """Processes currently in the group (including sub-groups)."""
        out: set[int] = set()
        for p in self.paths:
            out.update(_procs_recursive(p))
        return sorted(out)

    def is_empty(self) -> bool:
        return not self.pids()

    @abstractmethod
    def apply_limits(self, limits: Limits) -> None:
        """Write all limits (``None`` = unlimited)."""

    @abstractmethod
    def set_cpu_quota(self, millis: int | None) -> None:
        """Change the CPU quota at run time (throttle/clamp an instance); ``None`` = unlimited."""

    @abstractmethod
    def set_memory_limit(self, memory_mb: int | None) -> None:
        """Change the memory limit (RAM+swap held at the same value)."""

    @abstractmethod
    def set_pids_max(self, pids_max: int | None) -> None:
        """Change the task-count limit."""

    @abstractmethod
    def stats(self) -> CgroupStats:
        """Current counters."""

    def oom_killed(self) -> bool:
        """True if the kernel OOM-killed at least one process of this group."""
        return self.stats().oom_kills > 0

    @property
    def pids_dir(self) -> Path:
        """The directory holding this group's pids controller files."""
        return self.paths[0]

    def pids_limit_hits(self) -> int:
        """How often a fork failed because the group was at its pids limit (``pids.events`` max).

        Read around every invocation, so the cheap way: one ``pread`` of a descriptor kept open
        (closed by :meth:`remove`), no path walk, stat or text layer; 0 when the file is missing.
        Other errors raise :class:`OSError`.
        """
        with self._pids_events_lock:
            fd = self._pids_events_fd
            if fd is None:
                try:
                    fd = os.open(self.pids_dir / "pids.events", os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    return 0
                self._pids_events_fd = fd
            raw = os.pread(fd, 4096, 0)
        for line in raw.splitlines():
            key, _, value = line.partition(b" ")
            if key == b"max":
                return int(value)
        return 0

    def _close_files(self) -> None:
        with self._pids_events_lock:
            fd, self._pids_events_fd = self._pids_events_fd, None
        if fd is not None:
            os.close(fd)

    def _quota_us(self, millis: int) -> int:
        return max(MIN_CPU_QUOTA_US, millis * self.cpu_period_us // 1000)

    def kill_all(self, timeout_s: float = 5.0) -> None:
        """SIGKILL every process of the group, repeating until it is empty.

        Repeating matters: a process may fork between our reading cgroup.procs and the kill, and
        the new child is in the group too (the pids limit bounds how long this can go on).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            pids = self.pids()
            if not pids:
                return
            if time.monotonic() >= deadline:
                raise CgroupBusy(f"instance {self.instance_id}: processes {pids} survived kill_all for {timeout_s}s")
            _kill_pids(pids, [Path(p) for p in self.procs_paths])
            time.sleep(_POLL_S)

    def remove(self, timeout_s: float = 2.0) -> None:
        """rmdir the group (every hierarchy on v1). It must be empty: call :meth:`kill_all` first.

        Zombies do not keep a group busy, so the agent may reap its child after removal.
        """
        self._close_files()
        busy = self.pids()
        if busy:
            raise CgroupBusy(f"instance {self.instance_id} still has processes {busy}; kill_all() first")
        for p in self.paths:
            _rmdir_tree(p, timeout_s)

    def destroy(self, timeout_s: float = 5.0) -> None:
        """kill_all() then remove(): the normal end of an instance."""
        self.kill_all(timeout_s)
        self.remove()


class V2InstanceCgroup(InstanceCgroup):
    """Instance group on the unified (v2) hierarchy."""

    version = 2

    def __init__(self, path: Path, instance_id: str, cpu_period_us: int = DEFAULT_CPU_PERIOD_US) -> None:
        super().__init__(instance_id, cpu_period_us)
        self.path = path

    @property
    def paths(self) -> list[Path]:
        return [self.path]

    def apply_limits(self, limits: Limits) -> None:
        self.set_cpu_quota(limits.cpu_millis)
        self.set_memory_limit(limits.memory_mb)
        self.set_pids_max(limits.pids_max)

    def set_cpu_quota(self, millis: int | None) -> None:
        if millis is None and not (self.path / "cpu.max").exists():
            return  # controller not enabled (only possible with a driver built without it)
        quota = "max" if millis is None else str(self._quota_us(millis))
        _write(self.path / "cpu.max", f"{quota} {self.cpu_period_us}")

    def set_memory_limit(self, memory_mb: int | None) -> None:
        if memory_mb is None and not (self.path / "memory.max").exists():
            return
        _write(self.path / "memory.max", "max" if memory_mb is None else str(memory_mb * 1024 * 1024))
        # Without this a limited group pages out to swap instead of being OOM-killed, and its
        # memory.current stays under the limit: the limit would only slow it down.
        swap = self.path / "memory.swap.max"
        if swap.exists():
            _write(swap, "max" if memory_mb is None else "0")
        # An OOM in an instance kills the whole instance, not one random worker inside it, so it
        # never keeps running half-dead.
        oom_group = self.path / "memory.oom.group"
        if oom_group.exists():
            _write(oom_group, "1")

    def set_pids_max(self, pids_max: int | None) -> None:
        if pids_max is None and not (self.path / "pids.max").exists():
            return
        _write(self.path / "pids.max", "max" if pids_max is None else str(pids_max))

    def stats(self) -> CgroupStats:
        cpu = _read_keyed(self.path / "cpu.stat", missing_ok=False)  # cpu.stat is core on v2: always there
        events = _read_keyed(self.path / "memory.events")
        peak = self.path / "memory.peak"
        wait: int | None = None
        try:
            total = parse_psi(_read_text(self.path / "cpu.pressure")).get("total")
            wait = None if total is None else int(total) * 1000  # usec
        except (OSError, CgroupError):
            pass  # a kernel without PSI has no cpu.pressure
        return CgroupStats(
            cpu_usage_ns=cpu.get("usage_usec", 0) * 1000,
            memory_bytes=_read_int(self.path / "memory.current", 0),
            memory_peak_bytes=_read_int(peak) if peak.exists() else None,
            pids=_read_int(self.path / "pids.current", 0),
            cpu_throttled_ns=cpu.get("throttled_usec", 0) * 1000,
            nr_throttled=cpu.get("nr_throttled", 0),
            oom_kills=events.get("oom_kill", 0),
            cpu_wait_ns=wait,
        )

    def kill_all(self, timeout_s: float = 5.0) -> None:
        # cgroup.kill (kernel >= 5.14) kills the whole subtree atomically, forks included.
        kill = self.path / "cgroup.kill"
        if kill.exists() and self.pids():
            _write(kill, "1")
        super().kill_all(timeout_s)  # waits until empty; pid-by-pid on older kernels


class V1InstanceCgroup(InstanceCgroup):
    """Instance group spread over the v1 hierarchies (cpu, cpuacct, memory, pids)."""

    version = 1

    def __init__(self, dirs: Mapping[str, Path], instance_id: str, cpu_period_us: int = DEFAULT_CPU_PERIOD_US) -> None:
        super().__init__(instance_id, cpu_period_us)
        self.dirs = dict(dirs)  # controller -> directory (co-mounted controllers share one)

    @property
    def paths(self) -> list[Path]:
        return list(dict.fromkeys(self.dirs.values()))

    @property
    def pids_dir(self) -> Path:
        return self.dirs.get("pids", self.paths[0])

    def apply_limits(self, limits: Limits) -> None:
        self.set_cpu_quota(limits.cpu_millis)
        self.set_memory_limit(limits.memory_mb)
        self.set_pids_max(limits.pids_max)

    def set_cpu_quota(self, millis: int | None) -> None:
        cpu = self.dirs["cpu"]
        _write(cpu / "cpu.cfs_period_us", str(self.cpu_period_us))
        _write(cpu / "cpu.cfs_quota_us", "-1" if millis is None else str(self._quota_us(millis)))

    def set_memory_limit(self, memory_mb: int | None) -> None:
        mem = self.dirs["memory"]
        value = "-1" if memory_mb is None else str(memory_mb * 1024 * 1024)
        memsw = mem / "memory.memsw.limit_in_bytes"
        if not memsw.exists():  # kernel without swap accounting: RAM limit only
            _write(mem / "memory.limit_in_bytes", value)
            return
        # memsw (RAM+swap) must stay >= limit_in_bytes at every moment, or the kernel says EINVAL:
        # lowering goes limit first, raising goes memsw first. Try one order, then the other.
        try:
            _write(mem / "memory.limit_in_bytes", value)
            _write(memsw, value)
        except CgroupError:
            _write(memsw, value)
            _write(mem / "memory.limit_in_bytes", value)

    def set_pids_max(self, pids_max: int | None) -> None:
        _write(self.dirs["pids"] / "pids.max", "max" if pids_max is None else str(pids_max))

    def stats(self) -> CgroupStats:
        mem = self.dirs["memory"]
        cpu = _read_keyed(self.dirs["cpu"] / "cpu.stat")
        oom = _read_keyed(mem / "memory.oom_control")
        # oom_kill in memory.oom_control exists since 4.13; before that failcnt (limit hits,
        # which usually but not always end in a kill) is the best signal there is.
        oom_kills = oom["oom_kill"] if "oom_kill" in oom else _read_int(mem / "memory.failcnt", 0)
        return CgroupStats(
            cpu_usage_ns=_read_int(self.dirs["cpuacct"] / "cpuacct.usage"),
            memory_bytes=_read_int(mem / "memory.usage_in_bytes"),
            memory_peak_bytes=_read_int(mem / "memory.max_usage_in_bytes", 0),
            pids=_read_int(self.dirs["pids"] / "pids.current", 0),
            cpu_throttled_ns=cpu.get("throttled_time", 0),
            nr_throttled=cpu.get("nr_throttled", 0),
            oom_kills=oom_kills,
        )


def oom_killed(group: InstanceCgroup, returncode: int | None = None) -> bool:
    """Did this instance die of the cgroup OOM killer?

    With ``returncode`` (from ``Popen.returncode``), also require the main process to have died of
    SIGKILL: an OOM of a helper subprocess with the main process exiting normally is not an OOM exit.
    """
    if returncode is not None and returncode != -signal.SIGKILL:
        return False
    try:
        return group.oom_killed()
    except CgroupError:
        return False  # group already removed: nothing to tell


# --------------------------------------------------------------------------- drivers


class CgroupDriver(ABC):
    """Creates the per-agent parent ``<prefix>/<node>`` and the per-instance groups below it."""

    version: int

    def __init__(self, node: str, prefix: str = DEFAULT_PREFIX, cpu_period_us: int = DEFAULT_CPU_PERIOD_US) -> None:
        self.node = _check_name("node", node)
        self.prefix = _check_name("prefix", prefix)
        self.cpu_period_us = cpu_period_us

    @abstractmethod
    def setup(self) -> None:
        """Create the parent groups (idempotent). Raises :class:`CgroupUnavailable` with the reason."""

    @abstractmethod
    def node_dirs(self, node: str | None = None) -> list[Path]:
        """The ``<prefix>/<node>`` directories (one per hierarchy on v1)."""

    @abstractmethod
    def get(self, instance_id: str, node: str | None = None) -> InstanceCgroup:
        """A handle on an instance group, existing or not (nothing is created)."""

    def create(self, instance_id: str, limits: Limits) -> InstanceCgroup:
        """Create ``<prefix>/<node>/<instance_id>`` and write its limits.

        An existing group of that id is an error (ids are unique; a leftover needs
        :meth:`cleanup_leftovers`). If a limit cannot be written the group is removed again.
        """
        group = self.get(_check_name("instance id", instance_id))
        created: list[Path] = []
        try:
            for path in group.paths:
                try:
                    path.mkdir()
                except FileExistsError:
                    raise CgroupError(f"cgroup {path} already exists (leftover? run cleanup_leftovers())") from None
                except OSError as exc:
                    raise CgroupError(f"cannot create cgroup {path}: {exc.strerror}") from exc
                created.append(path)
            group.apply_limits(limits)
        except BaseException:
            for path in reversed(created):
                try:
                    os.rmdir(path)
                except OSError:
                    pass
            raise
        return group

    def list_instances(self, node: str | None = None) -> list[str]:
        """Instance groups present under ``<prefix>/<node>`` (union over v1 hierarchies)."""
        names: set[str] = set()
        for d in self.node_dirs(node):
            if d.is_dir():
                names.update(e.name for e in os.scandir(d) if e.is_dir(follow_symlinks=False))
        return sorted(names)

    def cleanup_leftovers(self, node: str | None = None) -> list[str]:
        """Kill and remove every instance group left under ``<prefix>/<node>`` (agent restart).

        Returns the instance ids removed. Call it before creating any instance: it removes all.
        """
        removed = []
        for name in self.list_instances(node):
            group = self.get(name, node)
            group.kill_all()
            group.remove()
            removed.append(name)
        return removed

    def close(self) -> None:
        """Remove the (empty) node group, and the prefix group if no other agent uses it."""
        for d in self.node_dirs():
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise CgroupBusy(f"cannot remove {d}: {exc.strerror} (instances left?)") from exc
            try:
                os.rmdir(d.parent)
            except OSError:
                pass  # another node's agent still has its groups there


class V2Driver(CgroupDriver):
    """cgroup v2: everything below ``base`` (our own group, or a delegated one)."""

    version = 2

    def __init__(
        self,
        base: Path | str,
        node: str,
        prefix: str = DEFAULT_PREFIX,
        controllers: Iterable[str] = V2_CONTROLLERS,
        evacuate: bool = True,
        cpu_period_us: int = DEFAULT_CPU_PERIOD_US,
    ) -> None:
        super().__init__(node, prefix, cpu_period_us)
        self.base = Path(base)
        self.controllers = tuple(controllers)
        self.evacuate = evacuate

    def node_dirs(self, node: str | None = None) -> list[Path]:
        return [self.base / self.prefix / (node or self.node)]

    def get(self, instance_id: str, node: str | None = None) -> V2InstanceCgroup:
        return V2InstanceCgroup(self.node_dirs(node)[0] / instance_id, instance_id, self.cpu_period_us)

    def setup(self) -> None:
        available = set(_read_text(self.base / "cgroup.controllers").split()) if self.base.exists() else set()
        missing = [c for c in self.controllers if c not in available]
        if missing:
            raise CgroupUnavailable(
                f"cgroup v2 controllers {missing} are not available in {self.base} (cgroup.controllers: "
                f"{sorted(available) or 'empty'}): not delegated to us (systemd: Delegate=yes) or bound to v1"
            )
        prefix_dir = self.base / self.prefix
        node_dir = prefix_dir / self.node
        try:
            # base -> prefix -> node must each pass the controllers down; instances are leaves.
            self._enable(self.base)
            prefix_dir.mkdir(exist_ok=True)
            self._enable(prefix_dir)
            node_dir.mkdir(exist_ok=True)
            self._enable(node_dir)
        except OSError as exc:
            raise CgroupUnavailable(f"cannot create {node_dir}: {exc.strerror}") from exc
        except CgroupError as exc:
            raise CgroupUnavailable(str(exc)) from exc

    def _enable(self, group: Path) -> None:
        if not self.controllers:
            return
        current = set(_read_text(group / "cgroup.subtree_control").split())
        wanted = [c for c in self.controllers if c not in current]
        if not wanted:
            return
        value = " ".join(f"+{c}" for c in wanted)
        try:
            _write(group / "cgroup.subtree_control", value)
        except CgroupError as exc:
            cause = exc.__cause__
            # "No internal processes": a non-root group with processes in it cannot hand controllers
            # to children. Our own group usually holds the agent itself (systemd service, container).
            if not (isinstance(cause, OSError) and cause.errno == errno.EBUSY and group == self.base):
                raise
            if not self.evacuate:
                raise CgroupUnavailable(
                    f"{group} has processes, so controllers cannot be enabled for sub-groups (v2 'no internal "
                    f"processes' rule); move them to a leaf group or construct the driver with evacuate=True"
                ) from exc
            self._evacuate_base()
            _write(group / "cgroup.subtree_control", value)

    def _evacuate_base(self) -> None:
        """Move every process of ``base`` (the agent and its siblings) into ``base/<prefix>-agent``.

        This is what systemd's Delegate= documentation asks of a delegated service; in a container
        it moves the container's processes one level down, which is harmless to them.
        """
        leaf = self.base / f"{self.prefix}-agent"
        leaf.mkdir(exist_ok=True)
        for _ in range(10):  # processes may fork while we move them
            pids = _read_pids(self.base / "cgroup.procs")
            if not pids:
                return
            for pid in pids:
                try:
                    _write(leaf / "cgroup.procs", str(pid))
                except CgroupError as exc:
                    if not (isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ESRCH):
                        raise
        raise CgroupUnavailable(f"could not empty {self.base} into {leaf}: processes keep appearing")


class V1Driver(CgroupDriver):
    """cgroup v1: one ``<prefix>/<node>/<instance>`` tree per needed hierarchy."""

    version = 1

    def __init__(
        self,
        hierarchies: Mapping[str, Path | str],
        node: str,
        prefix: str = DEFAULT_PREFIX,
        cpu_period_us: int = DEFAULT_CPU_PERIOD_US,
    ) -> None:
        """``hierarchies`` maps each of cpu, cpuacct, memory, pids to our own group in its hierarchy."""
        super().__init__(node, prefix, cpu_period_us)
        missing = [c for c in V1_CONTROLLERS if c not in hierarchies]
        if missing:
            raise CgroupUnavailable(f"cgroup v1 hierarchies missing for controllers {missing}")
        self.hierarchies = {c: Path(p) for c, p in hierarchies.items() if c in V1_CONTROLLERS}

    def _node_dir_map(self, node: str | None) -> dict[str, Path]:
        return {c: base / self.prefix / (node or self.node) for c, base in self.hierarchies.items()}

    def node_dirs(self, node: str | None = None) -> list[Path]:
        return list(dict.fromkeys(self._node_dir_map(node).values()))

    def get(self, instance_id: str, node: str | None = None) -> V1InstanceCgroup:
        dirs = {c: d / instance_id for c, d in self._node_dir_map(node).items()}
        return V1InstanceCgroup(dirs, instance_id, self.cpu_period_us)

    def setup(self) -> None:
        for d in self.node_dirs():
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CgroupUnavailable(
                    f"cannot create {d}: {exc.strerror} (read-only cgroup mount in a container, or not root?)"
                ) from exc
        mem = self._node_dir_map(None)["memory"]
        # Before 5.x kernels children were not accounted in their parent unless use_hierarchy=1;
        # the node group must see its instances' usage. (Always 1 and read-only on new kernels.)
        use_hierarchy = mem / "memory.use_hierarchy"
        if use_hierarchy.exists() and _read_text(use_hierarchy).strip() != "1":
            try:
                _write(use_hierarchy, "1")
            except CgroupError:
                pass  # set by the parent already, or not changeable: accounting is then flat


# --------------------------------------------------------------------------- detection


def _v2_base(root: Path, mounts: list[_Mount], own: Mapping[str, str]) -> Path:
    """Our own group under a v2 root: the mount point + our path, or ``root`` itself if it is a
    sub-directory of the mount (an explicitly delegated group given via STOKER_CGROUP_ROOT)."""
    for m in mounts:
        if m.fstype == "cgroup2" and m.mountpoint.resolve() == root.resolve():
            return _below_mount(m, own.get(""))
    return root


def _v1_hierarchies(root: Path, mounts: list[_Mount], own: Mapping[str, str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for m in mounts:
        if m.fstype != "cgroup" or not _is_under(m.mountpoint, root):
            continue
        for c in V1_CONTROLLERS:
            if c in m.options and c not in found:  # first mount wins (bind mounts repeat hierarchies)
                found[c] = _below_mount(m, own.get(c))
    return found


def detect(
    node: str | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    prefix: str = DEFAULT_PREFIX,
    cpu_period_us: int = DEFAULT_CPU_PERIOD_US,
) -> CgroupDriver:
    """Find a usable cgroup setup, create ``<prefix>/<node>`` in it and return its driver.

    ``root`` (else env ``STOKER_CGROUP_ROOT``, else /sys/fs/cgroup) is where cgroup filesystems are
    mounted. If ``root/cgroup.controllers`` exists it is cgroup v2: a v2 mount point (we then go
    down to our own group from /proc/self/cgroup) or any delegated group below one (used as is).
    Otherwise the v1 hierarchies mounted under ``root`` are used (hybrid hosts, whose
    ``root/unified`` v2 mount has no controllers, land here).

    Raises :class:`CgroupUnavailable` with the reason when neither works.
    """
    node = node or os.environ.get("STOKER_NODE_NAME") or "runtime-0"
    root_path = Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT)
    if not root_path.is_dir():
        raise CgroupUnavailable(f"cgroup root {root_path} does not exist (is /sys/fs/cgroup mounted?)")
    try:
        mounts = _cgroup_mounts()
        own = _own_cgroups()
    except OSError as exc:
        raise CgroupUnavailable(f"cannot read /proc/self/mountinfo or /proc/self/cgroup: {exc}") from exc

    driver: CgroupDriver
    if (root_path / "cgroup.controllers").exists():
        driver = V2Driver(_v2_base(root_path, mounts, own), node, prefix, cpu_period_us=cpu_period_us)
    else:
        hierarchies = _v1_hierarchies(root_path, mounts, own)
        missing = [c for c in V1_CONTROLLERS if c not in hierarchies]
        if missing:
            raise CgroupUnavailable(
                f"no cgroup v2 at {root_path} (no cgroup.controllers) and cgroup v1 controllers {missing} "
                f"are not mounted under it (found: {sorted(hierarchies) or 'none'})"
            )
        driver = V1Driver(hierarchies, node, prefix, cpu_period_us=cpu_period_us)
    driver.setup()
    return driver


def cleanup_leftovers(
    node: str, *, root: str | os.PathLike[str] | None = None, prefix: str = DEFAULT_PREFIX
) -> list[str]:
    """After an agent crash: kill and remove the instance groups of ``node``; returns their ids."""
    return detect(node, root=root, prefix=prefix).cleanup_leftovers()
