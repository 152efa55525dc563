"""Starting instances on a node: the zygote, cgroups, the sandbox user, per-instance placement.

The node agent asks for a new generic instance and gets one forked from the zygote (start kind
``zygote``) or, when there is no zygote, a new interpreter (``spawn``). Limits follow the
instance's life: generic defaults while it waits in the pool, the function's own once it is
specialized, the defaults again after a ``reset``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import stat
import uuid
from pathlib import Path

from events import FunctionSpec
from services.agent import cgroups, sandbox
from services.agent.instances import Instance, InstanceDied, Placement, Zygote, instance_env, spawn_instance
from services.agent.settings import AgentSettings

log = logging.getLogger("stoker.agent.launcher")

GENERIC_LIMITS = cgroups.Limits(cpu_millis=1000, memory_mb=256, pids_max=64)
"""What an instance may use before a function is loaded into it."""


def readable_by(uid: int, gid: int, path: Path) -> bool:
    """Whether ``uid``/``gid`` can reach and read ``path`` (every parent traversable)."""
    current = path.resolve()
    for part in [*reversed(current.parents), current]:
        try:
            st = part.stat()
        except OSError:
            return False
        bits = stat.S_IXOTH | (stat.S_IROTH if part == current else 0)
        if st.st_uid == uid:
            bits = stat.S_IXUSR | (stat.S_IRUSR if part == current else 0)
        elif st.st_gid == gid:
            bits = stat.S_IXGRP | (stat.S_IRGRP if part == current else 0)
        if st.st_mode & bits != bits:
            return False
    return True


def choose_user(setting: str, python: str) -> tuple[int, int] | None:
    """The uid/gid instances run as, or None to keep the agent's user.

    ``auto``: an unprivileged user (nobody) when the agent runs as root and that user can read the
    interpreter's installation; otherwise the agent's own user (and a warning says why).
    """
    if os.geteuid() != 0 or setting == "root":
        return None
    import pwd

    name = "nobody" if setting == "auto" else setting
    uid, gid = sandbox.default_user() if name == "nobody" else (pwd.getpwnam(name).pw_uid, pwd.getpwnam(name).pw_gid)
    prefix = Path(os.path.realpath(python)).parents[1]
    if not readable_by(uid, gid, prefix / "lib"):
        message = f"instances cannot run as {name}: it cannot read the interpreter under {prefix}"
        if setting != "auto":
            raise RuntimeError(message)
        log.warning("%s; they run as root (install Python where %s can read it)", message, name)
        return None
    return uid, gid


class Launcher:
    """Creates confined instances for one node agent."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.driver: cgroups.CgroupDriver | None = None
        self.zygote: Zygote | None = None
        self.user: tuple[int, int] | None = None
        self.notes: dict[str, str] = {}
        """What the sandbox could and could not do here, reported in the node's labels."""

    async def start(self) -> None:
        settings = self.settings
        self.user = choose_user(settings.instance_user, settings.python)
        self.notes["stoker.io/instance-user"] = (
            "root"
            if self.user is None and os.geteuid() == 0
            else (str(self.user[0]) if self.user else str(os.geteuid()))
        )
        if settings.cgroups != "off":
            # One prefix per platform (state folder): two platforms on one host never touch each
            # other's instance groups, and a restarted agent finds exactly its own leftovers.
            prefix = "stoker-" + hashlib.sha256(str(settings.common.home).encode()).hexdigest()[:8]
            try:
                self.driver = await asyncio.to_thread(cgroups.detect, settings.node, prefix=prefix)
                removed = await asyncio.to_thread(self.driver.cleanup_leftovers)
                if removed:
                    log.warning("removed %d leftover instance cgroups of a previous agent: %s", len(removed), removed)
                self.notes["stoker.io/cgroups"] = f"v{self.driver.version}"
            except cgroups.CgroupError as exc:
                if settings.cgroups == "on":
                    raise
                log.warning("instances run without cgroups: %s", exc)
                self.notes["stoker.io/cgroups"] = "unavailable"
        if settings.zygote:
            self.zygote = Zygote(settings.python, settings.zygote_preload, settings.node_dir / "logs" / "zygote.log")
            try:
                await self.zygote.start()
            except (InstanceDied, OSError, TimeoutError) as exc:
                log.error("no zygote (instances will be spawned): %s", exc)
                self.zygote = None

    def _placement(self, instance_id: str) -> Placement:
        node_dir = self.settings.node_dir
        workdir = node_dir / "instances" / instance_id
        log_path = node_dir / "logs" / f"{instance_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            uid, gid = self.user
            workdir.parent.mkdir(parents=True, exist_ok=True)
            sandbox.prepare_workdir(workdir, uid, gid)
            (workdir / "tmp").mkdir(exist_ok=True)
            os.chown(workdir / "tmp", uid, gid)
        else:
            (workdir / "tmp").mkdir(parents=True, exist_ok=True)
        group = self.driver.create(instance_id, GENERIC_LIMITS) if self.driver is not None else None
        spec = sandbox.SandboxSpec(
            cgroup_procs=tuple(group.procs_paths) if group is not None else (),
            drop_privileges=self.user is not None,
            uid=self.user[0] if self.user else None,
            gid=self.user[1] if self.user else None,
            memory_mb=GENERIC_LIMITS.memory_mb,
            memory_rlimit="none",  # the cgroup holds memory; a data rlimit would be fixed at start
            fsize_mb=256,
        )
        return Placement(workdir, log_path, instance_env(workdir), spec, group)

    async def new_instance(self) -> Instance:
        """A new generic instance: forked from the zygote when there is one, else spawned."""
        instance_id = uuid.uuid4().hex[:12]
        placement = await asyncio.to_thread(self._placement, instance_id)
        try:
            if self.zygote is not None and self.zygote.alive:
                return await self.zygote.fork(instance_id, placement)
            return await spawn_instance(self.settings.node_dir, self.settings.python, place=lambda _iid: placement)
        except BaseException:
            if placement.cgroup is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(placement.cgroup.destroy)
            raise

    async def specialized(self, inst: Instance, spec: FunctionSpec) -> None:
        """The function's own limits, now that its code is in the instance."""
        if inst.cgroup is not None:
            group = inst.cgroup
            await asyncio.to_thread(
                group.apply_limits,
                cgroups.Limits(cpu_millis=spec.cpu_millis, memory_mb=spec.memory_mb, pids_max=spec.pids_limit),
            )

    async def generic(self, inst: Instance) -> None:
        """Back to the pool's defaults (after a reset)."""
        if inst.cgroup is not None:
            await asyncio.to_thread(inst.cgroup.apply_limits, GENERIC_LIMITS)

    async def stop(self) -> None:
        if self.zygote is not None:
            await self.zygote.stop()
        if self.driver is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.driver.close)
