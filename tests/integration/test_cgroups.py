"""Real cgroups on this machine (v1 or v2, whichever detect() finds): limits, OOM, pids, CPU quota,
kill/remove, crash leftovers, and the child-side sandbox (no-gap join, rlimits, privilege drop).

Nothing is mocked and nothing is skipped: if cgroups are unusable here, the fixture fails with
detect()'s reason. Needs root (the agent runs as root to manage cgroups).
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.agent import cgroups
from services.agent.cgroups import CgroupDriver, CgroupUnavailable, InstanceCgroup, Limits, V2Driver, detect
from services.agent.sandbox import SandboxSpec, default_user, prepare_workdir, spawn

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def _iid() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def driver() -> Iterator[CgroupDriver]:
    assert os.geteuid() == 0, "cgroup tests need root (as the agent does)"
    node = f"test-{uuid.uuid4().hex[:8]}"
    d = detect(node)  # CgroupUnavailable here fails every test with the reason
    try:
        yield d
    finally:
        d.cleanup_leftovers()
        d.close()
        assert not any(p.exists() for p in d.node_dirs()), "node group left behind"


def run_in(group: InstanceCgroup, code: str, spec: SandboxSpec | None = None, **kw: Any) -> subprocess.Popen[bytes]:
    """Start `python -c code` as root, joining `group` from inside the child before exec."""
    spec = spec or SandboxSpec(cgroup_procs=group.procs_paths, drop_privileges=False, memory_rlimit="none")
    return spawn([sys.executable, "-I", "-c", code], spec, stdout=subprocess.PIPE, **kw)


def read_line(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> str:
    assert proc.stdout is not None
    fd, buf, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout_s
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"no line from child within {timeout_s}s (got {buf!r})"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            assert chunk, f"child closed stdout early (got {buf!r}, rc={proc.poll()})"
            buf += chunk
    return buf.decode().splitlines()[0]


def read_file(group: InstanceCgroup, controller: str, name: str) -> str:
    base = group.dirs[controller] if isinstance(group, cgroups.V1InstanceCgroup) else group.paths[0]
    return (base / name).read_text().strip()


def python_for(uid: int, gid: int) -> str:
    """An interpreter the unprivileged user can execute (this venv's may sit under 0700 /root)."""
    for cand in (sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        real = Path(os.path.realpath(cand))
        if not real.is_file() or not real.stat().st_mode & stat.S_IXOTH:
            continue
        if all(a.stat().st_mode & stat.S_IXOTH for a in real.parents):
            return str(real)
    raise AssertionError(f"no python3 executable by uid {uid}/gid {gid} on this machine")


def test_detects_the_machines_cgroup_version(driver: CgroupDriver) -> None:
    unified = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    assert driver.version == (2 if unified else 1)
    assert all(d.is_dir() for d in driver.node_dirs())


def test_limits_written_and_child_joins_before_exec(driver: CgroupDriver) -> None:
    iid = _iid()
    cg = driver.create(iid, Limits(cpu_millis=250, memory_mb=128, pids_max=32))
    try:
        if isinstance(cg, cgroups.V1InstanceCgroup):
            assert read_file(cg, "cpu", "cpu.cfs_period_us") == "100000"
            assert read_file(cg, "cpu", "cpu.cfs_quota_us") == "25000"
            assert read_file(cg, "memory", "memory.limit_in_bytes") == str(128 * MiB)
            if (cg.dirs["memory"] / "memory.memsw.limit_in_bytes").exists():
                assert read_file(cg, "memory", "memory.memsw.limit_in_bytes") == str(128 * MiB)
        else:
            assert read_file(cg, "cpu", "cpu.max") == "25000 100000"
            assert read_file(cg, "memory", "memory.max") == str(128 * MiB)
            if (cg.paths[0] / "memory.swap.max").exists():
                assert read_file(cg, "memory", "memory.swap.max") == "0"
        assert read_file(cg, "pids", "pids.max") == "32"

        # The first thing the exec'd program sees is already its instance group, in every hierarchy.
        proc = run_in(cg, "print(repr(open('/proc/self/cgroup').read()))")
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0
        lines = eval(out.decode()).splitlines()  # noqa: S307 - our own repr()
        joined = [ln for ln in lines if ln.endswith(f"/{driver.prefix}/{driver.node}/{iid}")]
        assert len(joined) == len(cg.paths), lines

        # Run-time changes: throttle/clamp CPU, raise memory (memsw-before-limit on v1), unlimit.
        cg.set_cpu_quota(500)
        cg.set_memory_limit(256)
        cg.set_pids_max(None)
        if cg.version == 1:
            assert read_file(cg, "cpu", "cpu.cfs_quota_us") == "50000"
            assert read_file(cg, "memory", "memory.limit_in_bytes") == str(256 * MiB)
        else:
            assert read_file(cg, "cpu", "cpu.max") == "50000 100000"
            assert read_file(cg, "memory", "memory.max") == str(256 * MiB)
        assert read_file(cg, "pids", "pids.max") == "max"
        cg.set_cpu_quota(None)
        cg.set_memory_limit(None)
        if cg.version == 1:
            assert read_file(cg, "cpu", "cpu.cfs_quota_us") == "-1"
            assert int(read_file(cg, "memory", "memory.limit_in_bytes")) > 1 << 50
        else:
            assert read_file(cg, "cpu", "cpu.max") == "max 100000"
            assert read_file(cg, "memory", "memory.max") == "max"
    finally:
        cg.destroy()
    assert not any(p.exists() for p in cg.paths)


def test_memory_balloon_is_oom_killed(driver: CgroupDriver) -> None:
    cg = driver.create(_iid(), Limits(memory_mb=64))
    try:
        # b"x" * n touches every page (a bytearray of zeros would stay unbacked and never count).
        proc = run_in(cg, "chunks = [b'x' * (1 << 20) for _ in range(200)]; print('survived', flush=True)")
        out, _ = proc.communicate(timeout=20)
        assert b"survived" not in out
        assert proc.returncode == -9, proc.returncode
        stats = cg.stats()
        assert stats.oom_kills >= 1, stats
        assert cg.oom_killed()
        assert cgroups.oom_killed(cg, proc.returncode)
        assert not cgroups.oom_killed(cg, 0)  # a clean exit is not an OOM exit
        assert stats.memory_peak_bytes is None or 32 * MiB <= stats.memory_peak_bytes <= 65 * MiB, stats
        cg.remove()
    finally:
        cg.destroy()


FORKER = """
import os, time
n, err = 0, None
for _ in range(50):
    try:
        pid = os.fork()
    except OSError as e:
        err = e
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    n += 1
print(f"spawned={n} errno={getattr(err, 'errno', None)}", flush=True)
time.sleep(60)
"""


def test_pids_limit_stops_fork_bomb_and_kill_all_empties_group(driver: CgroupDriver) -> None:
    cg = driver.create(_iid(), Limits(pids_max=10))
    try:
        proc = run_in(cg, FORKER)
        line = read_line(proc)
        # The python parent is one task, so 9 forks succeed and the 10th gets EAGAIN.
        assert line == f"spawned=9 errno={errno.EAGAIN}", line
        assert len(cg.pids()) == 10
        assert cg.stats().pids == 10
        cg.kill_all()
        assert cg.pids() == []
        assert proc.wait(timeout=5) == -9
        cg.remove()
        assert not any(p.exists() for p in cg.paths)
    finally:
        cg.destroy()


def test_cpu_quota_throttles_a_spinning_child(driver: CgroupDriver) -> None:
    cg = driver.create(_iid(), Limits(cpu_millis=100))
    try:
        start = time.monotonic()
        proc = run_in(cg, "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1.5: pass")
        proc.communicate(timeout=15)
        wall = time.monotonic() - start
        assert proc.returncode == 0
        stats = cg.stats()
        cpu_s = stats.cpu_usage_ns / 1e9
        # 100 millicores: ~0.1 s of CPU per wall second (startup included); unthrottled it would be ~1.5 s.
        assert 0.05 < cpu_s < 0.5, (cpu_s, wall, stats)
        assert cpu_s / wall < 0.25, (cpu_s, wall, stats)
        assert stats.nr_throttled > 0 and stats.cpu_throttled_ns > 0, stats
    finally:
        cg.destroy()


def test_stats_are_sane_and_remove_leaves_nothing(driver: CgroupDriver) -> None:
    cg = driver.create(_iid(), Limits(cpu_millis=1000, memory_mb=128, pids_max=16))
    try:
        code = "import time\nb = b'y' * (30 << 20)\nprint('ready', flush=True)\ntime.sleep(30)"
        proc = run_in(cg, code)
        assert read_line(proc) == "ready"
        s = cg.stats()
        assert 30 * MiB <= s.memory_bytes <= 128 * MiB, s
        assert s.memory_peak_bytes is None or s.memory_bytes <= s.memory_peak_bytes <= 128 * MiB, s
        assert s.pids == 1 and cg.pids() == [proc.pid], s
        assert 1_000_000 < s.cpu_usage_ns < 10_000_000_000, s
        assert s.oom_kills == 0 and s.nr_throttled >= 0 and s.cpu_throttled_ns >= 0, s
        with pytest.raises(cgroups.CgroupBusy):
            cg.remove()  # still populated
        cg.kill_all()
        proc.wait(timeout=5)
        cg.remove()
        assert not any(p.exists() for p in cg.paths)
        assert not cg.exists()
    finally:
        cg.destroy()


def test_cleanup_leftovers_after_agent_restart_kills_and_removes(driver: CgroupDriver) -> None:
    iid = _iid()
    cg = driver.create(iid, Limits(memory_mb=64, pids_max=8))
    # Parent-side join (add_pid) this time: the process ran briefly outside, then moved in.
    proc = subprocess.Popen([sys.executable, "-I", "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        cg.add_pid(proc.pid)
        assert cg.pids() == [proc.pid]
        # The agent "crashed": a new agent process for the same node detects again and cleans up.
        restarted = detect(driver.node)
        assert restarted.list_instances() == [iid]
        assert restarted.cleanup_leftovers() == [iid]
        assert proc.wait(timeout=5) == -9
        assert not any(p.exists() for p in cg.paths)
        assert cgroups.cleanup_leftovers(driver.node) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cg.destroy()


def test_child_as_nobody_with_rlimits_in_its_cgroup(driver: CgroupDriver) -> None:
    uid, gid = default_user()
    python = python_for(uid, gid)
    base = Path(tempfile.mkdtemp(prefix="stoker-sbx-", dir="/tmp"))
    cg = driver.create(_iid(), Limits(memory_mb=128, pids_max=16))
    try:
        base.chmod(0o755)
        secret = base / "secret"
        secret.mkdir(mode=0o700)  # root-owned
        work = prepare_workdir(base / "work", uid, gid)
        assert work.stat().st_uid == uid and stat.S_IMODE(work.stat().st_mode) == 0o700
        code = f"""
import errno, json, os, resource
out = {{"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups()}}
try:
    open({str(secret / "x")!r}, "w").write("x")
    out["secret"] = "written"
except PermissionError:
    out["secret"] = "denied"
with open("ok.txt", "w") as f:
    f.write("hello")
try:
    with open("big", "wb") as f:
        f.write(b"0" * (2 << 20))
    out["fsize"] = "unlimited"
except OSError as e:
    out["fsize"] = errno.errorcode.get(e.errno)
out["rlimits"] = {{n: resource.getrlimit(getattr(resource, n)) for n in ("RLIMIT_CORE", "RLIMIT_FSIZE",
                   "RLIMIT_DATA", "RLIMIT_NOFILE")}}
try:
    os.setuid(0)
    out["setuid0"] = "ok"
except PermissionError:
    out["setuid0"] = "denied"
out["status"] = [ln.strip() for ln in open("/proc/self/status") if ln.startswith(("NoNewPrivs", "CapEff"))]
out["cgroup"] = open("/proc/self/cgroup").read()
print(json.dumps(out), flush=True)
"""
        spec = SandboxSpec(cgroup_procs=cg.procs_paths, memory_mb=128, fsize_mb=1, nofile=64)
        proc = spawn([python, "-I", "-c", code], spec, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err.decode()
        r = json.loads(out)
        assert (r["uid"], r["euid"], r["gid"], r["groups"]) == (uid, uid, gid, [])
        assert r["secret"] == "denied" and not (secret / "x").exists()
        assert (work / "ok.txt").read_text() == "hello" and (work / "ok.txt").stat().st_uid == uid
        assert r["fsize"] == "EFBIG" and (work / "big").stat().st_size <= 1 * MiB
        assert r["rlimits"] == {
            "RLIMIT_CORE": [0, 0],
            "RLIMIT_FSIZE": [MiB, MiB],
            "RLIMIT_DATA": [(2 * 128 + 256) * MiB] * 2,
            "RLIMIT_NOFILE": [64, 64],
        }
        assert r["setuid0"] == "denied"
        assert sorted(r["status"]) == ["CapEff:\t0000000000000000", "NoNewPrivs:\t1"], r["status"]
        assert sum(ln.endswith(f"/{cg.instance_id}") for ln in r["cgroup"].splitlines()) == len(cg.paths)
    finally:
        cg.destroy()
        shutil.rmtree(base)


def test_prepare_workdir_refuses_unreachable_dirs_and_nproc_needs_dedicated_user(tmp_path: Path) -> None:
    uid, gid = default_user()
    # pytest's tmp_path sits under a 0700 /tmp/pytest-of-root: nobody could never reach it.
    with pytest.raises(PermissionError, match="not traversable"):
        prepare_workdir(tmp_path / "w", uid, gid)
    with pytest.raises(ValueError, match="dedicated_user"):
        spawn(["true"], SandboxSpec(nproc=10))


def test_instance_dies_with_its_agent(driver: CgroupDriver) -> None:
    uid, gid = default_user()
    cg = driver.create(_iid(), Limits(pids_max=8))
    # A stand-in agent spawns a sandboxed instance, then dies: PDEATHSIG (set after the uid change)
    # must still kill the instance.
    agent_code = f"""
import subprocess, sys
from services.agent.sandbox import SandboxSpec, spawn
p = spawn([{python_for(uid, gid)!r}, "-I", "-c", "import time; time.sleep(60)"],
          SandboxSpec(cgroup_procs={cg.procs_paths!r}), stdin=subprocess.DEVNULL)
print(p.pid, flush=True)
sys.stdin.read()
"""
    agent = subprocess.Popen(
        [sys.executable, "-c", agent_code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        child = int(read_line(agent))
        assert cg.pids() == [child]
        assert agent.stdin is not None
        agent.stdin.close()  # the agent exits
        assert agent.wait(timeout=5) == 0
        deadline = time.monotonic() + 5
        while cg.pids() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cg.pids() == [], "instance outlived its agent"
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        cg.destroy()


def _v2_mount_and_own_path() -> tuple[Path, str]:
    mount = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] == "cgroup2":
            mount = (left.split()[3], Path(left.split()[4]))
            break
    assert mount is not None, "no cgroup2 mount on this machine"
    own = next(ln.split(":", 2)[2] for ln in Path("/proc/self/cgroup").read_text().splitlines() if ln.startswith("0::"))
    mroot, mpoint = mount
    rel = own[len(mroot.rstrip("/")) :].strip("/") if own.startswith(mroot.rstrip("/")) else ""
    return mpoint, rel


def test_v2_mechanics_on_this_machines_cgroup2_tree() -> None:
    """cgroup.procs joins, cgroup.kill, rmdir and leftovers on the real v2 tree.

    On a hybrid host that tree has no controllers (they are bound to v1), so detect() must refuse it
    with the reason, and the driver is exercised without limits; on a v2 host it has them.
    """
    mpoint, rel = _v2_mount_and_own_path()
    available = set((mpoint / "cgroup.controllers").read_text().split())
    if {"cpu", "memory", "pids"} <= available:
        assert detect(f"probe-{uuid.uuid4().hex[:6]}", root=mpoint).version == 2  # v2 host: usable
        controllers: tuple[str, ...] = ("cpu", "memory", "pids")
    else:
        with pytest.raises(CgroupUnavailable, match="not available"):
            detect(f"probe-{uuid.uuid4().hex[:6]}", root=mpoint)
        controllers = ()
    d = V2Driver(mpoint / rel, f"test-{uuid.uuid4().hex[:8]}", controllers=controllers)
    d.setup()
    cg = d.create(_iid(), Limits())
    try:
        # The child escapes its process group (setsid) in its children: the cgroup still has them all.
        code = (
            "import os, time\n"
            "for _ in range(3):\n"
            "    if os.fork() == 0:\n"
            "        os.setsid(); time.sleep(60); os._exit(0)\n"
            "print('ready', flush=True)\ntime.sleep(60)"
        )
        proc = run_in(cg, code)
        assert read_line(proc) == "ready"
        assert len(cg.pids()) == 4
        assert cg.stats().cpu_usage_ns > 0
        assert (cg.paths[0] / "cgroup.kill").exists()  # kernel >= 5.14: the atomic path is used
        cg.kill_all()
        assert cg.pids() == [] and proc.wait(timeout=5) == -9
        cg.remove()
        assert not cg.paths[0].exists()
        assert d.cleanup_leftovers() == []
    finally:
        cg.destroy()
        d.close()
    assert not d.node_dirs()[0].exists()
