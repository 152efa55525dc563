"""What an instance's child process does between fork and exec, and the parent-side preparation.

The cgroup (:mod:`services.agent.cgroups`) is the primary boundary; this module adds:

* joining the instance cgroup from inside the child (no moment where instance code runs outside it),
* rlimits as a second line of defence (memory, file size, open files, no core dumps, optionally
  process count),
* ``no_new_privs`` and a privilege drop to an unprivileged user (``nobody``/``nogroup`` by default)
  when the agent runs as root,
* parent-death signal, so no instance outlives a crashed agent,
* for an instance (``instance_dir`` set): its own mount, IPC, UTS and network namespaces and a new
  root that holds only the runtime, its code and its scratch space (:mod:`services.agent.namespaces`),
  and a uid of its own.

Split between parent and child
------------------------------
Everything that may allocate, import, take locks or look things up (``pwd``/``grp`` lookups, ctypes
symbol resolution, path encoding, validation) happens in the *parent* in :func:`resolve`. The child
(:func:`make_preexec`'s closure, run by ``subprocess`` as ``preexec_fn`` after ``fork()``, before
``exec()``) only makes system calls, in this order — the order matters:

1. join the cgroup: write our pid to each ``cgroup.procs`` (needs root, so before the drop;
   before anything else, so that all later allocations are charged to the instance),
2. ``umask``,
3. ``setrlimit`` (lowering hard limits is always allowed, so before the drop too),
4. namespaces and the new root (mounts need root, so before the drop),
5. ``PR_SET_NO_NEW_PRIVS`` (setuid binaries then cannot regain privileges after exec),
6. ``setgroups`` -> ``setgid`` -> ``setuid`` (uid last: afterwards we could not change gids),
7. ``PR_SET_DUMPABLE`` back to 1 for an instance (the uid change cleared it, which would make its
   own ``/proc/self`` root's and unreadable to it; other uids still cannot ptrace it),
8. ``PR_SET_PDEATHSIG`` **after** the uid/gid change: the kernel clears the parent-death signal
   whenever the credentials change, so set before step 6 it would silently be lost.

``subprocess`` runs its own steps before ``preexec_fn`` (dup2 of stdio, ``chdir(cwd)``,
``setsid`` for ``start_new_session``, and ``user=``/``group=`` if given). Do **not** pass ``user=``
or ``group=`` to Popen together with a cgroup join: the drop would come before the join, and an
unprivileged process cannot write to root-owned ``cgroup.procs``.

``preexec_fn`` caveat: Python warns it is not safe with threads (the child has only the forking
thread; a lock held by another thread at fork time stays locked). The closure here takes no Python
locks and does not import or log, which is what makes it acceptable; keep it that way.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import os
import pwd
import resource
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.agent import namespaces

__all__ = [
    "ResolvedSandbox",
    "SandboxError",
    "SandboxSpec",
    "default_user",
    "die_with_parent",
    "join_cgroup_in_child",
    "make_preexec",
    "prepare_workdir",
    "resolve",
    "spawn",
]

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38

MiB = 1024 * 1024


class SandboxError(Exception):
    """What an instance needs from its sandbox cannot be given here (reported, never worked around)."""


@dataclass(frozen=True)
class SandboxSpec:
    """How to confine one instance process (all optional; defaults suit a function runtime)."""

    cgroup_procs: Sequence[str] = ()
    """``InstanceCgroup.procs_paths``: the child writes its own pid there before exec."""
    drop_privileges: bool = True
    """When the agent is root, run the child as ``uid``/``gid`` (default nobody/nogroup)."""
    uid: int | None = None
    gid: int | None = None
    dedicated_user: bool = False
    """True only if ``uid`` is used by this instance alone; required for ``nproc``."""
    memory_mb: int | None = None
    """The instance's memory limit; the rlimit derived from it is looser than the cgroup's."""
    memory_rlimit: Literal["data", "as", "none"] = "data"
    """RLIMIT_DATA (private writable memory) by default: RLIMIT_AS also counts address space
    that runtimes reserve without using (glibc arenas, Go, the JVM), and breaks them."""
    memory_rlimit_factor: float = 2.0
    memory_rlimit_headroom_mb: int = 256
    fsize_mb: int | None = 1024
    """Largest file the instance may write (RLIMIT_FSIZE): a runaway log cannot fill the disk."""
    nofile: int | None = 4096
    nproc: int | None = None
    """RLIMIT_NPROC counts *all* processes of the real uid on the machine, not of this instance:
    only meaningful with a ``dedicated_user``; the cgroup pids limit is the per-instance one."""
    core_dumps: bool = False
    umask: int | None = 0o077
    no_new_privs: bool = True
    die_with_parent: bool = True
    instance_dir: str | None = None
    """Host folder of an instance (``root``, ``work``, ``tmp``, ``code``): when set, the child gets
    its own namespaces and a new root built from it (:func:`namespaces.build_root`)."""
    python_prefix: str | None = None
    """The interpreter's installation, bound read-only into the new root at the same path."""
    etc_dir: str | None = None
    """The node's prepared ``/etc`` for instances (:func:`namespaces.prepare_etc`)."""
    unshare_net: bool = True
    """A new network namespace (loopback only). The zygote makes one ahead of each fork and clears this."""


@dataclass(frozen=True)
class ResolvedSandbox:
    """A :class:`SandboxSpec` turned into plain numbers and bytes, ready for the child."""

    cgroup_procs: tuple[bytes, ...]
    rlimits: tuple[tuple[int, int], ...]
    uid: int | None
    gid: int | None
    umask: int | None
    no_new_privs: bool
    die_with_parent: bool
    parent_pid: int
    prctl: Callable[..., int] | None = field(repr=False, default=None)
    root: namespaces.RootPlan | None = None
    unshare_net: bool = False


_prctl_fn: Callable[..., int] | None = None


def _prctl() -> Callable[..., int]:
    """libc's prctl via ctypes, resolved once in the parent (dlsym in a forked child is risky)."""
    global _prctl_fn
    if _prctl_fn is None:
        libc = ctypes.CDLL(None, use_errno=True)  # the libc already loaded into this process
        fn = libc.prctl
        fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        fn.restype = ctypes.c_int
        _prctl_fn = fn
    return _prctl_fn


def _call_prctl(fn: Callable[..., int], option: int, arg: int) -> None:
    if fn(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def default_user() -> tuple[int, int]:
    """uid/gid of ``nobody`` and ``nogroup`` (``nobody`` group on Red Hat-likes)."""
    uid = pwd.getpwnam("nobody").pw_uid
    for name in ("nogroup", "nobody"):
        try:
            return uid, grp.getgrnam(name).gr_gid
        except KeyError:
            continue
    return uid, pwd.getpwnam("nobody").pw_gid


def resolve(spec: SandboxSpec) -> ResolvedSandbox:
    """Validate ``spec`` and compute everything in the parent (lookups, sizes, encodings)."""
    uid = gid = None
    if spec.drop_privileges and os.geteuid() == 0:
        if spec.uid is None or spec.gid is None:
            d_uid, d_gid = default_user()
            uid = d_uid if spec.uid is None else spec.uid
            gid = d_gid if spec.gid is None else spec.gid
        else:
            uid, gid = spec.uid, spec.gid
        if uid == 0:
            raise ValueError("SandboxSpec: dropping privileges to uid 0 is no drop; pick an unprivileged uid")
    if spec.nproc is not None and (uid is None or not spec.dedicated_user):
        raise ValueError(
            "SandboxSpec.nproc needs a privilege drop to a dedicated_user: RLIMIT_NPROC counts every process of "
            "the uid machine-wide (and is ignored for root); use the cgroup pids limit per instance"
        )

    limits: list[tuple[int, int]] = []
    if not spec.core_dumps:
        limits.append((resource.RLIMIT_CORE, 0))  # a core of a function can hold its secrets and fill the disk
    if spec.memory_mb is not None and spec.memory_rlimit != "none":
        mb = int(spec.memory_mb * spec.memory_rlimit_factor) + spec.memory_rlimit_headroom_mb
        which = resource.RLIMIT_DATA if spec.memory_rlimit == "data" else resource.RLIMIT_AS
        limits.append((which, mb * MiB))
    if spec.fsize_mb is not None:
        limits.append((resource.RLIMIT_FSIZE, spec.fsize_mb * MiB))
    if spec.nofile is not None:
        limits.append((resource.RLIMIT_NOFILE, spec.nofile))
    if spec.nproc is not None:
        limits.append((resource.RLIMIT_NPROC, spec.nproc))

    root = None
    if spec.instance_dir is not None:
        if uid is None or gid is None or spec.etc_dir is None:
            raise ValueError("SandboxSpec: an instance root needs root to build it, a uid to drop to and an etc_dir")
        namespaces.libc()  # symbols resolved here, not in the child
        root = namespaces.plan_root(spec.instance_dir, spec.python_prefix or sys.base_prefix, spec.etc_dir, uid, gid)
    need_prctl = spec.no_new_privs or spec.die_with_parent or root is not None
    return ResolvedSandbox(
        cgroup_procs=tuple(os.fsencode(p) for p in spec.cgroup_procs),
        rlimits=tuple(limits),
        uid=uid,
        gid=gid,
        umask=spec.umask,
        no_new_privs=spec.no_new_privs,
        die_with_parent=spec.die_with_parent,
        parent_pid=os.getpid(),
        prctl=_prctl() if need_prctl else None,
        root=root,
        unshare_net=spec.unshare_net,
    )


# --------------------------------------------------------------------------- child side


def _fail(step: str, exc: BaseException) -> None:
    """Say what failed on the child's stderr (the instance log): subprocess only reports
    "Exception occurred in preexec_fn" to the parent, without the cause."""
    try:
        os.write(2, f"stoker sandbox: {step} failed: {exc}\n".encode())
    except OSError:
        pass


def join_cgroup_in_child(procs_paths: Sequence[str | bytes]) -> None:
    """In the child before exec: move this process into the instance cgroup (every v1 hierarchy).

    No gap: nothing of the instance runs before it is inside its cgroup (a parent-side
    ``add_pid`` after spawn leaves the exec and the first instructions outside of it).
    """
    pid = str(os.getpid()).encode()
    for path in procs_paths:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, pid)
        finally:
            os.close(fd)


def die_with_parent(parent_pid: int | None = None, prctl: Callable[..., int] | None = None) -> None:
    """In the child: get SIGKILL when the parent dies (``PR_SET_PDEATHSIG``).

    Must come after any uid/gid change (which clears it). If the parent died before the call, the
    signal will never come: compare ``getppid()`` with ``parent_pid`` and kill ourselves then.
    Note the signal is tied to the *thread* that forked: spawn from a long-lived thread (the event
    loop), not from a worker thread that may exit while the instance should live on.
    """
    before = os.getppid()
    _call_prctl(prctl or _prctl(), PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != before or (parent_pid is not None and before != parent_pid):
        os.kill(os.getpid(), signal.SIGKILL)


def drop_privileges(uid: int, gid: int) -> None:
    """In the child: become ``uid``/``gid`` with no supplementary groups, irreversibly."""
    os.setgroups([])  # root's supplementary groups (e.g. disk, docker) must not come along
    os.setgid(gid)  # setresgid: real, effective and saved
    os.setuid(uid)  # setresuid: real, effective and saved, so there is no way back
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise OSError(errno.EPERM, "privilege drop did not stick: setuid(0) succeeded")


def apply_in_child(r: ResolvedSandbox) -> None:
    """The whole child-side sequence (see the module docstring for why this order)."""
    step = "joining cgroup"
    try:
        if r.cgroup_procs:
            join_cgroup_in_child(r.cgroup_procs)
        if r.umask is not None:
            step = "umask"
            os.umask(r.umask)
        for which, value in r.rlimits:
            step = f"setrlimit({which}, {value})"
            resource.setrlimit(which, (value, value))
        if r.root is not None:
            step = "building the instance root"
            namespaces.build_root(r.root, r.unshare_net)
        if r.no_new_privs and r.prctl is not None:
            step = "PR_SET_NO_NEW_PRIVS"
            _call_prctl(r.prctl, PR_SET_NO_NEW_PRIVS, 1)
        if r.uid is not None and r.gid is not None:
            step = f"dropping privileges to {r.uid}:{r.gid}"
            drop_privileges(r.uid, r.gid)
        if r.root is not None and r.prctl is not None:
            step = "PR_SET_DUMPABLE"
            _call_prctl(r.prctl, PR_SET_DUMPABLE, 1)
        if r.die_with_parent and r.prctl is not None:
            step = "PR_SET_PDEATHSIG"
            die_with_parent(r.parent_pid, r.prctl)
    except BaseException as exc:
        _fail(step, exc)
        raise


def make_preexec(spec: SandboxSpec) -> Callable[[], None]:
    """A ``preexec_fn`` for ``subprocess.Popen`` / ``asyncio.create_subprocess_exec``.

    Call it in the process that spawns (it records that pid as the expected parent).
    """
    resolved = resolve(spec)

    def _preexec() -> None:
        apply_in_child(resolved)

    return _preexec


def spawn(argv: Sequence[str], spec: SandboxSpec, **popen_kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen`` with the sandbox applied; own session and closed fds by default."""
    if "user" in popen_kwargs or "group" in popen_kwargs or "extra_groups" in popen_kwargs:
        raise ValueError("pass uid/gid in SandboxSpec, not to Popen: Popen drops privileges before the cgroup join")
    popen_kwargs.setdefault("start_new_session", True)
    popen_kwargs.setdefault("close_fds", True)
    return subprocess.Popen(list(argv), preexec_fn=make_preexec(spec), **popen_kwargs)


# --------------------------------------------------------------------------- parent side


def _can_traverse(st: os.stat_result, uid: int, gid: int) -> bool:
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def prepare_workdir(path: str | os.PathLike[str], uid: int, gid: int, mode: int = 0o700) -> Path:
    """Create (or take over) an instance working directory owned by ``uid:gid``.

    Raises ``PermissionError`` if an ancestor is not traversable by that user (e.g. a 0700 state
    directory under /root): the instance could not even chdir there. Existing content is chowned
    without following symlinks, since a previous instance may have planted links to root's files.
    """
    p = Path(path)
    if p.is_symlink():
        raise PermissionError(f"workdir {p} is a symlink; refusing to chown through it")
    p.mkdir(parents=True, exist_ok=True)
    for ancestor in p.absolute().parents:
        if not _can_traverse(os.stat(ancestor), uid, gid):
            raise PermissionError(
                f"{ancestor} is not traversable by uid {uid}/gid {gid}, so {p} cannot be reached (chmod o+x it "
                "or put instance dirs elsewhere)"
            )
    for dirpath, dirnames, filenames in os.walk(p, followlinks=False):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)
    os.chown(p, uid, gid, follow_symlinks=False)
    os.chmod(p, mode)
    return p
