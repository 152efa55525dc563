"""Linux namespaces and mounts for instances: the new root an instance lives in, built without a
container engine (ctypes over libc; standard library only).

Why not bubblewrap: ``bwrap`` execs a new process, so every instance would pay for a fresh
interpreter (~150 ms here) instead of a ~1 ms fork of the pre-imported zygote; and a generic pool
instance gets its function's code only when it is specialized, long after it started, which bwrap
cannot add to a running sandbox. The same calls bwrap makes (``unshare``, bind mounts,
``pivot_root``) are made here by the instance's own process between ``fork`` and serving.

What an instance sees (``/`` is a tmpfs, read-only once built)::

    /usr, /bin, /lib, ...    the host's system tree (shared libraries), read-only
    <python prefix>          the interpreter and its standard library, read-only, at its host path
                             (so the zygote's ``sys.path`` stays valid); its site-packages hidden
    /etc                     a few files: ld.so.cache, nsswitch.conf, localtime, ssl, a passwd
    /dev                     null, zero, full, random, urandom, a private shm (read-write)
    /proc                    a new procfs with ``hidepid=invisible``: only the instance's own uid
    /work                    its scratch directory (HOME, cwd), read-write
    /tmp                     its private temp directory, read-write
    /code                    its function's code and dependencies, read-only, mounted by the agent
                             when the instance is specialized and unmounted again by a reset

``/code`` gets its code by mount propagation: the node's ``instances`` folder is a *shared* bind
mount on the host; the instance's copy of it is a *slave*, so a bind mount the agent makes on
``instances/<id>/code`` appears inside that instance (only: other instances bind other folders),
and nothing an instance mounts goes back. The platform's virtualenv, the state folder, other
functions' code and the agent's files are not in the new root at all.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MountError",
    "RootPlan",
    "bind_readonly",
    "build_root",
    "lo_up",
    "make_shared",
    "mounts_under",
    "new_netns",
    "plan_root",
    "prepare_etc",
    "private_mount_namespace",
    "unmount",
    "unmount_tree",
]

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 2

# The new mount API (Linux 5.2+, mount_setattr 5.12+): the same numbers on every architecture.
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine, 155)
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


class MountError(OSError):
    """A namespace or mount call failed (the message names the call and the path)."""


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """libc with argument types set, loaded once (call it in the parent, before any fork)."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.unshare.argtypes = [ctypes.c_int]
        lib.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        lib.syscall.restype = ctypes.c_long
        _libc = lib
    return _libc


def _check(result: int, what: str) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise MountError(err, f"{what}: {os.strerror(err)}")


def mount(source: bytes | None, target: bytes, fstype: bytes | None, flags: int, data: bytes | None = None) -> None:
    _check(libc().mount(source, target, fstype, flags, data), f"mount {target.decode(errors='replace')}")


def unshare(flags: int) -> None:
    _check(libc().unshare(flags), f"unshare({flags:#x})")


def unmount(path: str | bytes | os.PathLike[str]) -> None:
    """Detach whatever is mounted at ``path`` (lazily: a busy mount goes when its last user does)."""
    target = os.fsencode(path)
    if libc().umount2(target, MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not a mount point (any more)
            raise MountError(err, f"umount {os.fsdecode(target)}: {os.strerror(err)}")


# --------------------------------------------------------------------------- host side (the agent)


def mounts_under(path: str | os.PathLike[str], mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points at or below ``path`` in this mount namespace, deepest first."""
    base = os.path.realpath(path)
    found = []
    with open(mountinfo) as fh:
        for line in fh:
            point = line.split()[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            if point == base or point.startswith(base + "/"):
                found.append(point)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


def unmount_tree(path: str | os.PathLike[str]) -> list[str]:
    """Unmount everything at or below ``path`` (a crashed agent's leftovers); returns what went."""
    points = mounts_under(path)
    for point in points:
        unmount(point)
    return points


def private_mount_namespace() -> bool:
    """Move this process (the agent, before it starts any thread) into a mount namespace of its own,
    a slave of the host's: it sees what the host mounts, and what it mounts (the instances folder,
    every function's code) is seen by it, its zygote and its instances only, and goes when they
    do, even after a SIGKILL. Returns False (and does nothing) when not root.
    """
    if os.geteuid() != 0:
        return False
    import threading

    if threading.active_count() > 1:  # unshare would move only this thread
        raise MountError(errno.EINVAL, "a private mount namespace must be made before any thread starts")
    unshare(CLONE_NEWNS)
    mount(None, b"/", None, MS_REC | MS_SLAVE)
    return True


def make_shared(path: str | os.PathLike[str]) -> None:
    """Make ``path`` a mount point of its own, in a new peer group of its own (MS_SHARED).

    Private first, then shared: a fresh peer group, so nothing mounted below it propagates to
    whatever the host's own mounts are peered with (a systemd host's ``/`` is shared).
    """
    target = os.fsencode(os.path.realpath(path))
    mount(target, target, None, MS_BIND)
    mount(None, target, None, MS_PRIVATE)
    mount(None, target, None, MS_SHARED)


_new_api: bool | None = None


def bind_readonly(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Bind ``source`` read-only (nosuid, nodev) on ``target``, read-only from its first moment.

    With the new mount API the mount is made read-only *before* it is attached, so every copy
    that propagation makes is read-only too (a remount after a plain bind would only change the
    agent's own copy). Older kernels: bind and remount; the files stay root-owned and not
    writable by the instance's uid either way.
    """
    global _new_api
    src, dst = os.fsencode(source), os.fsencode(target)
    lib = libc()
    if _new_api is not False:
        fd = lib.syscall(SYS_OPEN_TREE, AT_FDCWD, src, ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC))
        if fd >= 0:
            try:
                attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)
                _check(
                    lib.syscall(SYS_MOUNT_SETATTR, fd, b"", ctypes.c_uint(AT_EMPTY_PATH), ctypes.byref(attr),
                                ctypes.c_size_t(ctypes.sizeof(attr))),
                    "mount_setattr",
                )
                _check(
                    lib.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, dst, ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)),
                    f"move_mount {os.fsdecode(dst)}",
                )
                _new_api = True
                return
            finally:
                os.close(fd)
        if ctypes.get_errno() != errno.ENOSYS:
            _check(-1, f"open_tree {os.fsdecode(src)}")
        _new_api = False
    mount(src, dst, None, MS_BIND)
    mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def lo_up() -> None:
    """Bring up the loopback device of the current network namespace (new ones start down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | IFF_UP, b""))


def new_netns() -> None:
    """Move this process into a new network namespace with only its loopback, up.

    The zygote calls it after each fork, while idle, so the next child starts in a namespace made
    ahead of time: a new one costs ~2 ms, which a fork on demand would otherwise wait for.
    """
    unshare(CLONE_NEWNET)
    lo_up()


# --------------------------------------------------------------------------- child side (the instance)


ETC_COPIES = ("ld.so.cache", "nsswitch.conf", "host.conf", "gai.conf", "protocols", "services", "mime.types",
              "timezone", "localtime", "resolv.conf")
"""Small host ``/etc`` files an instance needs (the dynamic linker's cache, name service order, ...)."""
ETC_BINDS = ("ssl", "ca-certificates")
"""Host ``/etc`` folders bound read-only inside the instance's ``/etc`` (certificates for egress)."""


def prepare_etc(dest: str | os.PathLike[str], uids: range, hostname: str = "sandbox") -> Path:
    """The ``/etc`` every instance of this node sees: copies of a few host files, a passwd naming
    every instance uid, and empty folders where :data:`ETC_BINDS` are bound. Made once per agent."""
    etc = Path(dest)
    etc.mkdir(parents=True, exist_ok=True)
    os.chmod(etc, 0o755)
    for name in ETC_COPIES:
        src, dst = Path("/etc", name), etc / name
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        if src.is_symlink() and os.readlink(src).startswith("/usr/"):
            dst.symlink_to(os.readlink(src))  # localtime -> /usr/share/zoneinfo/..., visible inside
        elif src.is_file():  # (a link elsewhere, e.g. resolv.conf -> /run/..., is copied as its content)
            dst.write_bytes(src.read_bytes())
            os.chmod(dst, 0o644)
    for name in ETC_BINDS:
        if Path("/etc", name).is_dir():
            (etc / name).mkdir(exist_ok=True)
    users = "".join(f"sandbox-{u}:x:{u}:{u}:instance:/work:/usr/sbin/nologin\n" for u in uids)
    groups = "".join(f"sandbox-{u}:x:{u}:\n" for u in uids)
    files = {
        "passwd": "root:x:0:0:root:/:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        + users,
        "group": "root:x:0:\nnogroup:x:65534:\n" + groups,
        "hosts": f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        "hostname": hostname + "\n",
    }
    for name, text in files.items():
        (etc / name).write_text(text)
        os.chmod(etc / name, 0o644)
    return etc


@dataclass(frozen=True)
class RootPlan:
    """Everything the child needs to build its root, as bytes and numbers (computed in the parent)."""

    instance_dir: bytes
    """Host folder of the instance: ``root`` (mount point of the new root), ``work``, ``tmp``, ``shm``, ``code``."""
    ro_trees: tuple[bytes, ...]
    """Host trees bound read-only at the same path (the system tree, the interpreter's prefix)."""
    hidden: tuple[bytes, ...]
    """Paths inside those trees covered by an empty read-only folder (the interpreter's site-packages)."""
    links: tuple[tuple[bytes, bytes], ...]
    """Top-level symlinks to recreate (``/lib`` -> ``usr/lib`` on merged-/usr hosts)."""
    etc_dir: bytes
    """The node's prepared ``/etc`` (:func:`prepare_etc`), bound read-only."""
    etc_binds: tuple[bytes, ...]
    """Host ``/etc`` folders bound read-only inside it."""
    hostname: bytes
    uid: int
    gid: int


DEVICES = (b"null", b"zero", b"full", b"random", b"urandom")


def _mkdirs(root: bytes, rel: bytes, mode: int = 0o755) -> bytes:
    path = root
    for part in rel.strip(b"/").split(b"/"):
        if not part:
            continue
        path = path + b"/" + part
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass
    return path


def _touch(path: bytes, mode: int = 0o644) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, mode))


def _bind(src: bytes, dst: bytes, readonly: bool, recursive: bool = False) -> None:
    mount(src, dst, None, MS_BIND | (MS_REC if recursive else 0))
    mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0))


def build_root(plan: RootPlan, unshare_net: bool) -> None:
    """In the child, as root: new mount/IPC/UTS (and network) namespaces, the new root, pivot.

    Called after the cgroup join and before the privilege drop; on return the process is in
    ``/work`` of its own root. Any failure raises: the instance must not run half-confined.
    About 2 ms, most of it the detach of the old root (an RCU grace period).
    """
    old_umask = os.umask(0)
    try:
        unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | (CLONE_NEWNET if unshare_net else 0))
        if unshare_net:
            lo_up()
        _check(libc().sethostname(plan.hostname, len(plan.hostname)), "sethostname")
        # Receive from the host, send nothing back: mounts made below stay in this namespace.
        mount(None, b"/", None, MS_REC | MS_SLAVE)
        inst = plan.instance_dir
        root = inst + b"/root"
        mount(b"tmpfs", root, b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=755,size=1m,nr_inodes=1024")
        for rel in (b"proc", b"dev", b"etc", b"work", b"tmp", b"code", b".empty"):
            os.mkdir(root + b"/" + rel, 0o755)
        os.chmod(root + b"/.empty", 0o555)
        for link, target in plan.links:
            os.symlink(target, root + b"/" + link)
        for tree in plan.ro_trees:
            _bind(tree, _mkdirs(root, tree), readonly=True, recursive=True)
        for hidden in plan.hidden:
            _bind(root + b"/.empty", root + hidden, readonly=True)
        _bind(plan.etc_dir, root + b"/etc", readonly=True)
        for name in plan.etc_binds:
            _bind(b"/etc/" + name, root + b"/etc/" + name, readonly=True, recursive=True)
        dev = root + b"/dev"
        for name in DEVICES:
            _touch(dev + b"/" + name, 0o666)
            mount(b"/dev/" + name, dev + b"/" + name, None, MS_BIND)  # device nodes: no remount needed
        for name, target in ((b"fd", b"/proc/self/fd"), (b"stdin", b"/proc/self/fd/0"),
                             (b"stdout", b"/proc/self/fd/1"), (b"stderr", b"/proc/self/fd/2")):
            os.symlink(target, dev + b"/" + name)
        os.mkdir(dev + b"/shm", 0o755)
        _bind(inst + b"/shm", dev + b"/shm", readonly=False)  # a host folder, so a reset can empty it
        # Only the instance's own uid is visible: not the agent, the zygote or other instances.
        mount(b"proc", root + b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, b"hidepid=invisible")
        _bind(inst + b"/work", root + b"/work", readonly=False)
        _bind(inst + b"/tmp", root + b"/tmp", readonly=False)
        # A slave of the host's shared instances folder: what the agent binds there shows up here.
        mount(inst + b"/code", root + b"/code", None, MS_BIND)
        os.chdir(root)
        _check(libc().syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
        # The old root is now stacked below the new one at "/": detach it (runc's trick, no put_old dir).
        _check(libc().umount2(b".", MNT_DETACH), "umount old root")
        os.chdir(b"/")
        mount(None, b"/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.chdir(b"/work")
    finally:
        os.umask(old_umask)


@functools.lru_cache(maxsize=8)
def _host_layout(python_prefix: str, etc_dir: str) -> tuple[tuple[bytes, ...], tuple[tuple[bytes, bytes], ...],
                                                           tuple[bytes, ...], tuple[bytes, ...]]:
    """The parts of a plan that are the same for every instance of a node (looked up once)."""
    prefix = os.path.realpath(python_prefix)
    trees: list[str] = ["/usr"]
    if not (prefix + "/").startswith("/usr/"):
        trees.append(prefix)
    links: list[tuple[bytes, bytes]] = []
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + top
        if os.path.islink(path):
            links.append((top.encode(), os.fsencode(os.readlink(path))))
        elif os.path.isdir(path):
            trees.append(path)
    # The interpreter's own site-packages may hold anything (here: orjson, pytest, ...): not the runtime's.
    hidden = [str(p) for p in Path(prefix, "lib").glob("python3*/site-packages") if p.is_dir()]
    binds = [name.encode() for name in ETC_BINDS if os.path.isdir(os.path.join(etc_dir, name))]
    return (tuple(os.fsencode(t) for t in trees), tuple(links), tuple(os.fsencode(h) for h in hidden), tuple(binds))


def plan_root(
    instance_dir: str | os.PathLike[str],
    python_prefix: str,
    etc_dir: str | os.PathLike[str],
    uid: int,
    gid: int,
    hostname: str = "sandbox",
) -> RootPlan:
    """What :func:`build_root` needs, looked up here (in the parent) so that the child only mounts."""
    trees, links, hidden, binds = _host_layout(python_prefix, os.path.realpath(etc_dir))
    return RootPlan(
        instance_dir=os.fsencode(os.path.realpath(instance_dir)),
        ro_trees=trees,
        hidden=hidden,
        links=links,
        etc_dir=os.fsencode(os.path.realpath(etc_dir)),
        etc_binds=binds,
        hostname=hostname.encode(),
        uid=uid,
        gid=gid,
    )
