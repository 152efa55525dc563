"""Starting instances on a node: the zygote, cgroups, the sandbox, per-instance quarters.

The node agent asks for a new generic instance and gets one forked from the zygote (start kind
``zygote``) or, when there is no zygote, a new interpreter (``spawn``). Limits follow the
instance's life: generic defaults while it waits in the pool, the function's own once it is
specialized, the defaults again after a ``reset``.

As root (always, for a real node) every instance is sandboxed: a *box* per instance, a uid of its
own (:class:`UidPool`) and a host folder (``instances/<id>``: the mount point of its new root, its
code slot, ``work``, ``tmp``, ``shm``) from which the child builds its namespaces and root
(:mod:`services.agent.namespaces`). :meth:`Launcher.attach` binds a function's code into the slot
when the instance is specialized; :meth:`Launcher.generic` takes it away and empties the scratch
folders after a reset; the box goes with the instance's process, everything of its uid killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import orjson

from events import FunctionSpec
from services.agent import cgroups, namespaces, sandbox
from services.agent.egress import Egress, EgressUnavailable
from services.agent.instances import (
    SCRUBBED_ENV_KEEP,
    Instance,
    InstanceDied,
    InstanceQuarters,
    Zygote,
    instance_env,
    spawn_instance,
)
from services.agent.settings import AgentSettings

log = logging.getLogger("stoker.agent.launcher")

GENERIC_LIMITS = cgroups.Limits(cpu_millis=1000, memory_mb=256, pids_max=64)
"""What an instance may use before a function is loaded into it."""


INSTANCE_DIRS = ("root", "code", "work", "tmp", "shm")
"""Each instance's host folder: the mount point of its new root, the slot its code is bound on,
its scratch directory (``/work``), its private ``/tmp`` and ``/dev/shm``."""
SCRATCH_DIRS = ("work", "tmp", "shm")
UID_LOCKS = Path("/run/stoker/uids")
"""One lock file per instance uid in use on this host, across every agent on it (``flock``)."""
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"


def parse_uid_range(raw: str) -> range:
    """``200000-201023`` -> range(200000, 201024); refuses uid 0 and system uids."""
    first, sep, last = raw.partition("-")
    try:
        lo, hi = int(first), int(last if sep else first)
    except ValueError:
        raise ValueError(f"STOKER_INSTANCE_UIDS {raw!r} is not FIRST-LAST") from None
    if lo < 1000 or hi < lo:
        raise ValueError(f"STOKER_INSTANCE_UIDS {raw!r}: uids from 1000 up, FIRST <= LAST")
    return range(lo, hi + 1)


class UidPool:
    """A uid of its own for each instance: two instances never share one, on this host.

    Held with ``flock`` on a file per uid, so two agents on one host (``stoker up`` runs two
    runtime nodes) never hand out the same uid, and an agent that dies releases its uids with its
    file descriptors. A uid is released only once no process of its instance is left.
    """

    def __init__(self, uids: range, lock_dir: Path = UID_LOCKS) -> None:
        self.uids, self.lock_dir = uids, lock_dir
        self._held: dict[int, int] = {}
        self._next = 0
        lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def acquire(self) -> int:
        count = len(self.uids)
        for step in range(count):
            uid = self.uids[(self._next + step) % count]
            if uid in self._held:
                continue
            fd = os.open(self.lock_dir / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._held[uid] = fd
            self._next = (self._next + step + 1) % count
            return uid
        raise sandbox.SandboxError(f"every instance uid of {self.uids} is in use on this host")

    def release(self, uid: int) -> None:
        fd = self._held.pop(uid, None)
        if fd is not None:
            os.close(fd)  # closing drops the lock

    def close(self) -> None:
        for uid in list(self._held):
            self.release(uid)


def processes_of(uid: int) -> list[int]:
    """Pids whose real uid is ``uid`` (the instance's own: no other process has it)."""
    found, needle = [], f"\nUid:\t{uid}\t".encode()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/status", "rb") as fh:
                    if needle in fh.read(2048):
                        found.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return found


def owned_by(uid: int) -> list[int]:
    """Pids whose /proc entry belongs to ``uid``: zombies too (a stat each, ~0.3 ms for the host)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(FileNotFoundError):
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    found.append(int(entry.name))
    return found


def kill_uid(uid: int, timeout_s: float = 5.0) -> None:
    """SIGKILL every process of ``uid`` until none is left (a fork race ends at the pids limit)."""
    deadline = time.monotonic() + timeout_s
    while pids := processes_of(uid):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise sandbox.SandboxError(f"processes of uid {uid} survive SIGKILL: {pids}")
        time.sleep(0.005)


def wipe(path: Path, uid: int) -> None:
    """Empty ``path`` (never following links) and give it back to ``uid`` with mode 0700."""
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
    os.chown(path, uid, uid, follow_symlinks=False)
    os.chmod(path, 0o700)


def base_prefix(python: str) -> str:
    """Where ``python``'s own installation lives (not a virtualenv's): what instances may see."""
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        return sys.base_prefix
    out = subprocess.run([python, "-I", "-c", "import sys; print(sys.base_prefix)"], capture_output=True,
                         text=True, check=True, timeout=30)
    return out.stdout.strip()


@dataclass
class _Box:
    """The sandbox of one instance, as the agent holds it."""

    uid: int
    dir: Path
    code: str | None = None
    """The code folder bound on ``dir/code`` now, if any."""
    egress: bool = False
    """Whether its namespace has a link out now (:mod:`services.agent.egress`)."""


class Launcher:
    """Creates confined instances for one node agent."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.driver: cgroups.CgroupDriver | None = None
        self.zygote: Zygote | None = None
        self.uids: UidPool | None = None
        """Set when instances are sandboxed (the agent is root): namespaces, a new root, a uid each."""
        self.instances_dir = settings.node_dir / "instances"
        self.etc_dir = settings.node_dir / "sandbox-etc"
        self.python_prefix = ""
        self._boxes: dict[str, _Box] = {}
        self._cleanups: set[asyncio.Task[None]] = set()
        self._readable: set[str] = set()
        self._umask = os.umask(0o022)
        os.umask(self._umask)
        self.egress: Egress | None = None
        self.egress_problem = "the agent is not root"
        self.platform = "stoker-" + hashlib.sha256(str(settings.common.home).encode()).hexdigest()[:8]
        self.notes: dict[str, str] = {}
        """What the sandbox could and could not do here, reported in the node's labels."""

    @property
    def sandboxed(self) -> bool:
        return self.uids is not None

    async def start(self) -> None:
        settings = self.settings
        if settings.cgroups != "off":
            # One prefix per platform (state folder): two platforms on one host never touch each
            # other's instance groups, and a restarted agent finds exactly its own leftovers.
            try:
                self.driver = await asyncio.to_thread(cgroups.detect, settings.node, prefix=self.platform)
                removed = await asyncio.to_thread(self.driver.cleanup_leftovers)
                if removed:
                    log.warning("removed %d leftover instance cgroups of a previous agent: %s", len(removed), removed)
                self.notes["stoker.io/cgroups"] = f"v{self.driver.version}"
            except cgroups.CgroupError as exc:
                if settings.cgroups == "on":
                    raise
                log.warning("instances run without cgroups: %s", exc)
                self.notes["stoker.io/cgroups"] = "unavailable"
        if os.geteuid() == 0:
            # Root: always the sandbox, never a root instance. Anything missing fails the agent's start.
            await asyncio.to_thread(self._setup_sandbox)
            self.notes["stoker.io/sandbox"] = "namespaces"
            self.notes["stoker.io/instance-user"] = "uid-per-instance"
            self.notes["stoker.io/egress"] = "available" if self.egress is not None else "unavailable"
        else:
            log.warning("the agent is not root: instances run as its own user (uid %d), without namespaces",
                        os.geteuid())
            self.notes["stoker.io/sandbox"] = "off"
            self.notes["stoker.io/instance-user"] = str(os.geteuid())
        if settings.zygote:
            # As root, the zygote also keeps a network namespace ready for each next child.
            self.zygote = Zygote(settings.python, settings.zygote_preload, settings.node_dir / "logs" / "zygote.log")
            try:
                await self.zygote.start()
            except (InstanceDied, OSError, TimeoutError) as exc:
                log.error("no zygote (instances will be spawned): %s", exc)
                self.zygote = None

    def _setup_sandbox(self) -> None:
        uids = parse_uid_range(self.settings.instance_uids)
        with contextlib.suppress(OSError):
            if os.stat("/proc/self/ns/mnt").st_ino == os.stat("/proc/1/ns/mnt").st_ino:
                log.warning("the agent shares the host's mount namespace (not started as `python -m "
                            "services.agent`): its mounts are on the host until it stops, or until the next "
                            "agent of this node cleans up after a crash")
        self.python_prefix = base_prefix(self.settings.python)
        base = self.instances_dir
        base.mkdir(parents=True, exist_ok=True)
        # A crashed agent's leftovers: its instances' processes died with it (parent-death signal)
        # and their cgroups were emptied above; their code mounts and folders go now.
        left = namespaces.unmount_tree(base)
        for entry in base.iterdir():
            shutil.rmtree(entry, ignore_errors=True)
        if [p for p in left if p != str(base.resolve())]:
            log.warning("removed the mounts a previous agent left: %s", left)
        os.chmod(base, 0o711)
        namespaces.make_shared(base)
        namespaces.prepare_etc(self.etc_dir, uids)
        self.uids = UidPool(uids)
        brokers = [part.rsplit(":", 1)[0] for part in self.settings.common.bootstrap.split(",") if part]
        try:
            self.egress = Egress.setup(f"{self.platform}-{self.settings.node}", uids, brokers,
                                       self.settings.egress_deny.split(","))
        except EgressUnavailable as exc:
            self.egress_problem = str(exc)
            log.warning("functions with network=egress will be refused on this node: %s", exc)

    def _quarters(self, instance_id: str) -> InstanceQuarters:
        node_dir = self.settings.node_dir
        log_path = node_dir / "logs" / f"{instance_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.uids is None:
            workdir = node_dir / "instances" / instance_id
            (workdir / "tmp").mkdir(parents=True, exist_ok=True)
            group = self.driver.create(instance_id, GENERIC_LIMITS) if self.driver is not None else None
            spec = sandbox.SandboxSpec(
                cgroup_procs=tuple(group.procs_paths) if group is not None else (),
                drop_privileges=False,
                memory_mb=GENERIC_LIMITS.memory_mb,
                memory_rlimit="none",
                fsize_mb=256,
            )
            return InstanceQuarters(workdir, log_path, instance_env(workdir), spec, group)
        uid = self.uids.acquire()
        box = _Box(uid, self.instances_dir / instance_id)
        self._boxes[instance_id] = box
        box.dir.mkdir(mode=0o755)
        for name in INSTANCE_DIRS:
            (box.dir / name).mkdir(mode=0o755)
        for name in SCRATCH_DIRS:
            os.chown(box.dir / name, uid, uid)
            os.chmod(box.dir / name, 0o700)
        group = self.driver.create(instance_id, GENERIC_LIMITS) if self.driver is not None else None
        spec = sandbox.SandboxSpec(
            cgroup_procs=tuple(group.procs_paths) if group is not None else (),
            uid=uid,
            gid=uid,
            dedicated_user=True,
            memory_mb=GENERIC_LIMITS.memory_mb,
            memory_rlimit="none",  # the cgroup holds memory; a data rlimit would be fixed at start
            fsize_mb=256,
            instance_dir=str(box.dir),
            python_prefix=self.python_prefix,
            etc_dir=str(self.etc_dir),
        )
        return InstanceQuarters(box.dir / "work", log_path, self._sandbox_env(uid), spec, group)

    @staticmethod
    def _sandbox_env(uid: int) -> dict[str, str]:
        env = {k: os.environ[k] for k in SCRUBBED_ENV_KEEP if k in os.environ}
        env.update(PATH=SANDBOX_PATH, HOME="/work", TMPDIR="/tmp", USER=f"sandbox-{uid}", LOGNAME=f"sandbox-{uid}",
                   PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        return env

    async def new_instance(self) -> Instance:
        """A new generic instance: forked from the zygote when there is one, else spawned."""
        made: dict[str, InstanceQuarters] = {}

        def place(instance_id: str) -> InstanceQuarters:
            made[instance_id] = self._quarters(instance_id)
            return made[instance_id]

        try:
            if self.zygote is not None and self.zygote.alive:
                instance_id = uuid.uuid4().hex[:12]
                await asyncio.to_thread(place, instance_id)
                inst = await self.zygote.fork(instance_id, made[instance_id])
            else:
                # spawn_instance names the instance; the box, its folder and cgroup take that name.
                inst = await spawn_instance(self.settings.node_dir, self.settings.python,
                                            place=lambda iid: self._spawn_quarters(place(iid)),
                                            module="services.runtime.zygote" if self.sandboxed else "services.runtime")
        except BaseException:
            for instance_id, quarters in made.items():
                await self._clean_box(instance_id, quarters.cgroup)
                if quarters.cgroup is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(quarters.cgroup.destroy)
            raise
        group = made[inst.id].cgroup
        if inst.id in self._boxes:
            # The box goes when the process does (destroyed, or dead on its own), with all it left.
            inst.exited.add_done_callback(lambda _f: self._schedule_cleanup(inst.id, group))
        return inst

    def _spawn_quarters(self, quarters: InstanceQuarters) -> InstanceQuarters:
        """For a spawned instance: the interpreter starts as root in its cgroup (preexec: join only)
        and confines itself once it has imported the runtime (``services.runtime.zygote``)."""
        if not self.sandboxed:
            return quarters
        spec = quarters.sandbox
        message = {
            "workdir": str(quarters.workdir),
            "env": quarters.env,
            "sandbox": {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.__dict__.items()},
        }
        env = instance_env(quarters.workdir)
        env["STOKER_INSTANCE"] = orjson.dumps(message).decode()
        join_only = sandbox.SandboxSpec(cgroup_procs=spec.cgroup_procs, drop_privileges=False, umask=None,
                                        no_new_privs=False, memory_rlimit="none", fsize_mb=None, nofile=None)
        return InstanceQuarters(quarters.workdir, quarters.log_path, env, join_only, quarters.cgroup)

    def _schedule_cleanup(self, instance_id: str, group: cgroups.InstanceCgroup | None) -> None:
        task = asyncio.get_running_loop().create_task(self._clean_box(instance_id, group), name=f"unbox:{instance_id}")
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _clean_box(self, instance_id: str, group: cgroups.InstanceCgroup | None) -> None:
        box = self._boxes.pop(instance_id, None)
        if box is not None:
            try:
                await asyncio.to_thread(self._unbox, box, group)
            except Exception:  # noqa: BLE001 - a leftover is logged; the uid is then not reused
                log.exception("could not clean up the sandbox of instance %s", instance_id)

    def _unbox(self, box: _Box, group: cgroups.InstanceCgroup | None) -> None:
        """Everything of one instance goes: its processes, its code mount, its folders, then its uid."""
        emptied = False
        if group is not None:
            with contextlib.suppress(Exception):
                group.kill_all()  # raises if anything survives; nothing leaves its cgroup
                emptied = True
        if not emptied:
            kill_uid(box.uid)  # the uid is the instance's alone: whatever still runs as it is the instance's
        self._disconnect(box)
        namespaces.unmount(box.dir / "code")  # the one host mount of a box (the rest are in its namespace)
        shutil.rmtree(box.dir)
        # Dead is not enough: until its zombies are reaped they are in /proc, and the next instance
        # with this uid would see them. The zygote reaps orphans too (it is their subreaper).
        deadline = time.monotonic() + 2.0
        while left := owned_by(box.uid):
            if time.monotonic() > deadline:
                log.warning("uid %d kept out of use: processes %s of its instance are not reaped", box.uid, left)
                return
            time.sleep(0.005)
        assert self.uids is not None
        self.uids.release(box.uid)

    async def attach(self, inst: Instance, spec: FunctionSpec, code_dir: Path) -> str:
        """Give a generic instance ``spec``'s code (and network); returns the code's path inside it.

        Raises :class:`sandbox.SandboxError` when the function asks for what this node cannot give.
        """
        box = self._boxes.get(inst.id)
        if box is None:
            return str(code_dir)  # not sandboxed (an agent that is not root): the host's network
        if spec.network == "egress" and not box.egress:
            if self.egress is None or inst.pid is None:
                raise sandbox.SandboxError(f"network=egress is not available on this node: {self.egress_problem}")
            await asyncio.to_thread(self.egress.connect, box.uid, inst.pid)
            box.egress = True
        elif spec.network == "none" and box.egress:
            await asyncio.to_thread(self._disconnect, box)
        if box.code != str(code_dir):
            self._bind_code(box, code_dir)  # a few syscalls (~0.2 ms): cheaper than a hop to a thread
        return "/code"

    def _disconnect(self, box: _Box) -> None:
        if box.egress and self.egress is not None:
            self.egress.disconnect(box.uid)
        box.egress = False

    def _bind_code(self, box: _Box, code_dir: Path) -> None:
        key = str(code_dir)
        if key not in self._readable:
            # The cache is unpacked by root into a 0700 folder (mkdtemp): readable, not writable, by
            # instances. What is inside follows the agent's umask: walked only if that hides it.
            os.chmod(code_dir, 0o755)
            if self._umask & 0o055:
                for dirpath, _dirnames, filenames in os.walk(code_dir):
                    os.chmod(dirpath, 0o755)
                    for name in filenames:
                        path = os.path.join(dirpath, name)
                        if not os.path.islink(path):
                            os.chmod(path, 0o644)
            self._readable.add(key)
        if box.code is not None:
            namespaces.unmount(box.dir / "code")
        namespaces.bind_readonly(code_dir, box.dir / "code")
        box.code = key

    async def specialized(self, inst: Instance, spec: FunctionSpec) -> None:
        """The function's own limits, now that its code is in the instance."""
        if inst.cgroup is not None:
            group = inst.cgroup
            await asyncio.to_thread(
                group.apply_limits,
                cgroups.Limits(cpu_millis=spec.cpu_millis, memory_mb=spec.memory_mb, pids_max=spec.pids_limit),
            )

    async def generic(self, inst: Instance) -> str | None:
        """Back to the pool's defaults after a reset: no code, empty /work and /tmp, generic limits.

        Returns why the instance cannot be reused instead (it left processes running), or None.
        """
        box = self._boxes.get(inst.id)
        if box is not None:
            left = await asyncio.to_thread(self._reset_box, inst, box)
            if left:
                return left
        if inst.cgroup is not None:
            await asyncio.to_thread(inst.cgroup.apply_limits, GENERIC_LIMITS)
        return None

    def _reset_box(self, inst: Instance, box: _Box) -> str | None:
        if inst.cgroup is not None:  # one read of one hierarchy: this is on the reset invocation's path
            procs = (inst.cgroup.pids_dir / "cgroup.procs").read_text().split()
            others = [int(pid) for pid in procs if int(pid) != inst.pid]
        else:
            others = [pid for pid in processes_of(box.uid) if pid != inst.pid]
        if others:
            return f"reset cannot undo the {len(others)} processes it left running"
        self._disconnect(box)  # a generic instance has loopback only again
        if box.code is not None:
            namespaces.unmount(box.dir / "code")
            box.code = None
        for name in SCRATCH_DIRS:
            wipe(box.dir / name, box.uid)
        return None

    async def stop(self) -> None:
        if self.zygote is not None:
            await self.zygote.stop()
        if self._cleanups:
            await asyncio.gather(*list(self._cleanups), return_exceptions=True)
        for instance_id in list(self._boxes):
            await self._clean_box(instance_id, None)
        if self.egress is not None:
            await asyncio.to_thread(self.egress.close)
        if self.uids is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(namespaces.unmount_tree, self.instances_dir)
            self.uids.close()
        if self.driver is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.driver.close)
