"""The embedded platform: start, supervise and stop the broker and every service as local processes.

Each component runs in its own session with its pid in ``<home>/run/<name>.pid`` and its log in
``<home>/logs/<name>.log``; it reports healthy by writing ``<home>/run/<name>.ready``.

The services and node agents run under a supervisor, ``python -m services.cli.platform supervise``,
whose log is the platform's own, ``<home>/logs/platform.log``. It runs what
``<home>/run/supervisor/specs/`` lists (one JSON file per component, written by ``up`` and ``stoker
node add``), starts a component that died again after a backoff that doubles with each quick exit
(``RestartPolicy``), and keeps a record per component in ``<home>/run/supervisor/state/`` (restarts,
the last exit's reason, when the current process started) that ``stoker status`` reads. It is
written here rather than taken from supervisord; the reasons are in the commit that added it. The
broker is started directly and not restarted: a dead broker stays dead until ``stoker down``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from services.cli import broker as kafka
from services.cli.topics import platform_topic_specs
from services.common.admin import ensure_topics
from services.common.runner import ready_file
from services.common.settings import CommonSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
STOP_TIMEOUT_S = 20.0
"""How long a component has to stop after SIGTERM before it gets SIGKILL."""
START_ATTEMPTS = 3
"""``up`` gives up on a component that exited this many times before it became ready."""


class PlatformError(RuntimeError):
    """The platform could not be started or stopped; the message says why and where to look."""


@dataclass(frozen=True)
class Component:
    name: str
    """Its pid, ready, log and spec files are named after it; also its ``STOKER_INSTANCE_NAME``."""
    module: str
    """Run as ``python -m <module>``."""
    env: dict[str, str] = field(default_factory=dict)
    """Its own settings, over the platform's environment."""


def copy_names(service: str, copies: int) -> list[str]:
    """Names of the copies of a service: the plain name for one copy, ``name-0`` … for several."""
    return [service] if copies == 1 else [f"{service}-{i}" for i in range(copies)]


@dataclass(frozen=True)
class PlatformConfig:
    common: CommonSettings
    embedded_broker: bool = True
    http_port: int = 8080
    console_port: int = 8081
    """The web console's port (the gateway's ``/console`` redirects there)."""
    nodes: int = 2
    """Runtime nodes (tainted ``stoker.io/dedicated=runtime:NoSchedule``)."""
    isolated: int = 1
    """Isolation nodes (tainted ``stoker.io/dedicated=isolated:NoSchedule``): where outliers go."""
    pool_size: int = 2
    dispatchers: int = 1
    """Copies of the dispatcher (``dispatcher``, or ``dispatcher-0`` … when more than one)."""
    poolmgrs: int = 1
    """Copies of the pool manager."""
    workflow_engines: int = 1
    """Copies of the workflow engine."""

    @property
    def node_names(self) -> list[str]:
        return (
            ["management-0"]
            + [f"runtime-{i}" for i in range(self.nodes)]
            + [f"isolated-{i}" for i in range(self.isolated)]
        )

    def agent(self, node: str, role: str, labels: str = "", taints: str = "") -> Component:
        env = {
            "STOKER_NODE_NAME": node,
            "STOKER_POOL_SIZE": str(self.pool_size),
            "STOKER_NODE_LABELS": ",".join(filter(None, [f"stoker.io/role={role}", labels])),
            "STOKER_NODE_TAINTS": ",".join(
                filter(
                    None, [f"stoker.io/dedicated={role}:NoSchedule" if role in ("runtime", "isolated") else "", taints]
                )
            ),
        }
        if role == "management":
            # Management nodes run the services, no functions: no instances, no zygote.
            env.update(STOKER_MAX_INSTANCES="0", STOKER_POOL_SIZE="0", STOKER_ZYGOTE="off")
        return Component(f"agent-{node}", "services.agent", env)

    def components(self) -> list[Component]:
        # The services are reported to run on the management node.
        on_management = {"STOKER_NODE_NAME": "management-0"}
        pool = {"STOKER_POOL_SIZE": str(self.pool_size)}
        comps = [Component(n, "services.dispatcher", on_management) for n in copy_names("dispatcher", self.dispatchers)]
        comps += [
            Component(n, "services.poolmgr", {**pool, **on_management}) for n in copy_names("poolmgr", self.poolmgrs)
        ]
        comps += [
            Component("builder", "services.builder", on_management),
            Component("throttler", "services.throttler", on_management),
        ]
        comps += [
            Component(n, "services.workflow", on_management) for n in copy_names("workflow", self.workflow_engines)
        ]
        comps.append(Component("trigger", "services.trigger", on_management))
        comps += [self.agent(n, n.rsplit("-", 1)[0]) for n in self.node_names]
        comps.append(
            Component("console", "services.console", {"STOKER_CONSOLE_PORT": str(self.console_port), **on_management})
        )
        comps.append(
            Component(
                "gateway",
                "services.gateway",
                {
                    "STOKER_HTTP_PORT": str(self.http_port),
                    "STOKER_CONSOLE_URL": f"http://127.0.0.1:{self.console_port}/console",
                    **on_management,
                },
            )
        )
        return comps


# ----- files under <home>/run ------------------------------------------------------------------------


def pid_path(common: CommonSettings, name: str) -> Path:
    return common.run_dir / f"{name}.pid"


def supervisor_dir(common: CommonSettings) -> Path:
    return common.run_dir / "supervisor"


def platform_log(common: CommonSettings) -> Path:
    """The supervisor's log: every start, exit (with its reason and the end of the component's log), stop."""
    return common.logs_dir / "platform.log"


def read_pid(common: CommonSettings, name: str) -> int | None:
    try:
        return int(pid_path(common, name).read_text().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def supervisor_pid(common: CommonSettings) -> int | None:
    """The running supervisor's pid, or None."""
    try:
        pid = int((supervisor_dir(common) / "pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def running_components(common: CommonSettings) -> dict[str, int]:
    """Every component with a pid file whose process is alive."""
    found: dict[str, int] = {}
    if common.run_dir.is_dir():
        for path in sorted(common.run_dir.glob("*.pid")):
            pid = read_pid(common, path.stem)
            if pid is not None and alive(pid):
                found[path.stem] = pid
    return found


def ready_facts(common: CommonSettings, name: str) -> dict[str, object]:
    """What a component wrote in its ready file (pid, node, ...), or nothing."""
    try:
        facts = orjson.loads(ready_file(common, name).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return facts if isinstance(facts, dict) else {}


def is_ready(common: CommonSettings, name: str) -> bool:
    pid = read_pid(common, name)
    if not alive(pid) or not ready_file(common, name).exists():
        return False
    # The ready file of a process that died and was started again is not the new process's.
    return ready_facts(common, name).get("pid", pid) == pid


def log_tail(common: CommonSettings, name: str, lines: int = 30) -> str:
    return _tail(common.logs_dir / f"{name}.log", lines)


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _write_json(path: Path, value: Any) -> None:
    """Whole or not at all: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(value))
    tmp.replace(path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def write_spec(common: CommonSettings, comp: Component) -> None:
    """Ask the supervisor to run ``comp`` (rewriting a spec also starts a waiting component at once)."""
    _write_json(supervisor_dir(common) / "specs" / f"{comp.name}.json", asdict(comp))


def supervised(common: CommonSettings) -> list[str]:
    """Names of the components the supervisor runs, sorted."""
    return sorted(p.stem for p in (supervisor_dir(common) / "specs").glob("*.json"))


def restart_record(common: CommonSettings, name: str) -> dict[str, Any] | None:
    """The supervisor's record of a component: ``state`` (running, backoff, stopped), ``pid``,
    ``started_at`` (epoch seconds), ``restarts``, ``next_start_at`` and ``last_exit`` (``at``,
    ``reason``, ``exit_code``, ``signal``, ``uptime_s``); None when it is not supervised."""
    return _read_json(supervisor_dir(common) / "state" / f"{name}.json")


def services_status(common: CommonSettings) -> dict[str, dict[str, Any]]:
    """One row per service and agent: pid, ready, node, and the supervisor's state and restarts."""
    running = running_components(common)
    names = set(running) - {"broker"}
    if supervisor_pid(common) is not None:
        names |= set(supervised(common))
    now = time.time()
    rows: dict[str, dict[str, Any]] = {}
    for name in sorted(names):
        pid = running.get(name)
        record = restart_record(common, name) or {}
        up_since = record.get("started_at") if pid is not None and record.get("pid") == pid else None
        rows[name] = {
            "pid": pid,
            "ready": is_ready(common, name),
            "node": ready_facts(common, name).get("node"),
            "state": record.get("state", "running" if pid is not None else "stopped"),
            "restarts": record.get("restarts", 0),
            "uptime_s": round(now - up_since, 1) if up_since else None,
            "last_exit": record.get("last_exit"),
            "next_start_in_s": (
                round(max(0.0, record["next_start_at"] - now), 1) if record.get("next_start_at") else None
            ),
        }
    return rows


# ----- supervision ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestartPolicy:
    """When a component that died is started again (Kubernetes' CrashLoopBackOff, in short)."""

    first_delay_s: float = 0.5
    """Delay before starting again after the first exit."""
    max_delay_s: float = 30.0
    """The delay doubles with each quick exit in a row, up to this."""
    stable_s: float = 30.0
    """A process that stayed up this long was healthy: its exit starts the doubling afresh."""

    def quick_exits(self, previous: int, uptime_s: float) -> int:
        """Exits in a row, counting one that came ``uptime_s`` after its start."""
        return 1 if uptime_s >= self.stable_s else previous + 1

    def delay(self, quick_exits: int) -> float:
        """Seconds to wait before the next start after ``quick_exits`` exits in a row."""
        return min(self.max_delay_s, self.first_delay_s * 2 ** min(max(quick_exits - 1, 0), 30))


def exit_reason(returncode: int) -> tuple[str, int | None, str | None]:
    """(reason, exit code, signal name) of a process's end, from ``Popen.returncode``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}", None, name
    return f"exited with code {returncode}", returncode, None


def spawn(common: CommonSettings, comp: Component) -> subprocess.Popen[bytes]:
    """Start one component in its own session, its output appended to its log."""
    common.run_dir.mkdir(parents=True, exist_ok=True)
    common.logs_dir.mkdir(parents=True, exist_ok=True)
    ready_file(common, comp.name).unlink(missing_ok=True)
    env = {
        **os.environ,
        "STOKER_HOME": str(common.home),
        "STOKER_BOOTSTRAP": common.bootstrap,
        "STOKER_TOPIC_PREFIX": common.topic_prefix,
        "STOKER_INSTANCE_NAME": comp.name,
        **comp.env,
    }
    with (common.logs_dir / f"{comp.name}.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", comp.module],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            cwd=common.home,
            start_new_session=True,
        )
    pid_path(common, comp.name).write_text(str(proc.pid))
    return proc


@dataclass
class _Child:
    spec: Component
    spec_mtime: int
    next_start: float | None
    """Monotonic time of the next start; None while it runs."""
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    started_mono: float = 0.0
    starts: int = 0
    quick_exits: int = 0
    last_exit: dict[str, Any] | None = None
    stopped: bool = False


class Supervisor:
    """Keeps every component in ``<home>/run/supervisor/specs`` running until SIGTERM, then stops them."""

    def __init__(self, common: CommonSettings, policy: RestartPolicy | None = None) -> None:
        self.common = common
        self.policy = policy or RestartPolicy()
        self.children: dict[str, _Child] = {}
        self.stopping = False
        self.rescan = True
        self.log = logging.getLogger("stoker.supervisor")

    def run(self) -> None:
        # Signals only wake the loop (through the pipe); the loop does the work.
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_rescan)
        signal.signal(signal.SIGCHLD, lambda _sig, _frame: None)
        self.log.info("supervising the components of %s (pid %d)", self.common.home, os.getpid())
        last_scan = 0.0
        while not self.stopping:
            now = time.monotonic()
            try:
                if self.rescan or now - last_scan >= 1.0:
                    self.rescan, last_scan = False, now
                    self._read_specs(now)
                self.tick(now)
            except Exception:  # noqa: BLE001 - the supervisor must outlive its own bugs
                self.log.exception("supervisor tick failed")
            waits = [c.next_start - now for c in self.children.values() if c.next_start is not None]
            timeout = max(0.0, min([1.0, *waits]))
            with contextlib.suppress(InterruptedError):
                select.select([wake_r], [], [], timeout)
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 512):
                    pass
        self.stop_all()

    def _on_stop(self, _sig: int, _frame: object) -> None:
        self.stopping = True

    def _on_rescan(self, _sig: int, _frame: object) -> None:
        self.rescan = True

    def _read_specs(self, now: float) -> None:
        for path in sorted((supervisor_dir(self.common) / "specs").glob("*.json")):
            try:
                mtime = path.stat().st_mtime_ns
            except OSError:
                continue
            child = self.children.get(path.stem)
            if child is not None and child.spec_mtime == mtime:
                continue
            raw = _read_json(path)
            if raw is None:
                continue
            spec = Component(name=raw["name"], module=raw["module"], env=dict(raw.get("env") or {}))
            if child is None:
                self.children[spec.name] = _Child(spec, mtime, next_start=now)
            else:
                child.spec, child.spec_mtime = spec, mtime
                if child.proc is None:  # asked for again: no need to sit out the backoff
                    child.next_start = now

    def tick(self, now: float) -> None:
        """Notice exits and start what is due."""
        for child in self.children.values():
            if child.proc is not None and child.proc.poll() is not None:
                self._exited(child, now)
            if child.proc is None and child.next_start is not None and now >= child.next_start:
                self._start(child, now)

    def _start(self, child: _Child, now: float) -> None:
        try:
            child.proc = spawn(self.common, child.spec)
        except OSError as exc:
            self._failed(child, now, f"could not start: {exc}", None, None, 0.0)
            return
        child.starts += 1
        child.started_at, child.started_mono, child.next_start = time.time(), now, None
        if child.starts > 1:
            self.log.info("started %s again (pid %d, restart %d)", child.spec.name, child.proc.pid, child.starts - 1)
        else:
            self.log.info("started %s (pid %d)", child.spec.name, child.proc.pid)
        self._record(child)

    def _exited(self, child: _Child, now: float) -> None:
        assert child.proc is not None
        pid, returncode = child.proc.pid, child.proc.returncode
        child.proc = None
        reason, code, sig = exit_reason(returncode)
        self._failed(child, now, reason, code, sig, now - child.started_mono, pid)

    def _failed(
        self,
        child: _Child,
        now: float,
        reason: str,
        code: int | None,
        sig: str | None,
        uptime_s: float,
        pid: int | None = None,
    ) -> None:
        child.quick_exits = self.policy.quick_exits(child.quick_exits, uptime_s)
        delay = self.policy.delay(child.quick_exits)
        child.next_start = now + delay
        child.last_exit = {
            "at": round(time.time(), 3),
            "reason": reason,
            "exit_code": code,
            "signal": sig,
            "uptime_s": round(uptime_s, 1),
        }
        name = child.spec.name
        tail = "\n".join("    " + line for line in log_tail(self.common, name, 20).splitlines())
        self.log.warning(
            "%s (pid %s) %s after %.1fs up; starting it again in %gs (exit %d in a row). The end of %s:\n%s",
            name,
            pid if pid is not None else "-",
            reason,
            uptime_s,
            delay,
            child.quick_exits,
            self.common.logs_dir / f"{name}.log",
            tail,
        )
        self._record(child)

    def _record(self, child: _Child) -> None:
        running = child.proc is not None and not child.stopped
        state = "stopped" if child.stopped else "running" if running else "backoff"
        wall_next = time.time() + (child.next_start - time.monotonic()) if child.next_start is not None else None
        _write_json(
            supervisor_dir(self.common) / "state" / f"{child.spec.name}.json",
            {
                "state": state,
                "pid": child.proc.pid if running and child.proc is not None else None,
                "module": child.spec.module,
                "started_at": round(child.started_at, 3) if running else None,
                "restarts": max(0, child.starts - 1),
                "next_start_at": round(wall_next, 3) if wall_next is not None and not child.stopped else None,
                "last_exit": child.last_exit,
            },
        )

    def stop_all(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """The gateway first (no new work comes in), then everything else; SIGKILL after ``timeout_s``."""
        children = list(self.children.values())
        first = [c for c in children if c.spec.name.startswith("gateway")]
        for group in (first, [c for c in children if c not in first]):
            for child in group:
                child.stopped, child.next_start = True, None
                if child.proc is not None and child.proc.poll() is None:
                    signal_group(child.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            for child in group:
                if child.proc is not None:
                    try:
                        child.proc.wait(max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        self.log.warning("%s did not stop within %gs: SIGKILL", child.spec.name, timeout_s)
                        signal_group(child.proc.pid, signal.SIGKILL)
                        child.proc.wait()
                    self.log.info("stopped %s (%s)", child.spec.name, exit_reason(child.proc.returncode)[0])
                    pid_path(self.common, child.spec.name).unlink(missing_ok=True)
                ready_file(self.common, child.spec.name).unlink(missing_ok=True)
                self._record(child)
        self.log.info("supervisor stopped")


def start_supervisor(common: CommonSettings) -> int:
    """Start the supervisor in its own session (it outlives `stoker up --detach`)."""
    folder = supervisor_dir(common)
    folder.mkdir(parents=True, exist_ok=True)
    common.logs_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "STOKER_HOME": str(common.home),
        "STOKER_BOOTSTRAP": common.bootstrap,
        "STOKER_TOPIC_PREFIX": common.topic_prefix,
    }
    with platform_log(common).open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli.platform", "supervise"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            cwd=common.home,
            start_new_session=True,
        )
    (folder / "pid").write_text(str(proc.pid))
    return proc.pid


def supervise(common: CommonSettings) -> None:
    """The supervisor process's body (``python -m services.cli.platform supervise``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Supervisor(common).run()


# ----- the broker ----------------------------------------------------------------------------------


def broker_config(common: CommonSettings) -> kafka.BrokerConfig:
    host, _, port = common.bootstrap.rpartition(":")
    libs = os.environ.get("STOKER_KAFKA_LIBS")
    controller = os.environ.get("STOKER_CONTROLLER_PORT")
    return kafka.BrokerConfig(
        home=common.home,
        host=host or "127.0.0.1",
        port=int(port),
        controller_port=int(controller) if controller else int(port) + 1,
        libs_dir=Path(libs) if libs else None,
    )


def fetch_broker(common: CommonSettings) -> Path:
    """Fetch the Kafka jars once (cached under the state folder)."""
    cfg = broker_config(common)
    return kafka.fetch_artifacts(cfg.home, REPO_ROOT, cfg.libs_dir)


def start_broker(common: CommonSettings) -> int:
    cfg = broker_config(common)
    proc = kafka.launch(cfg, REPO_ROOT)
    common.run_dir.mkdir(parents=True, exist_ok=True)
    pid_path(common, "broker").write_text(str(proc.pid))
    return proc.pid


# ----- up, add, wait, down -------------------------------------------------------------------------


def start_component(config: PlatformConfig, comp: Component) -> None:
    """Have the running platform's supervisor run ``comp`` (now, and again whenever it dies)."""
    common = config.common
    pid = supervisor_pid(common)
    if pid is None:
        raise PlatformError(f"no platform supervisor runs from {common.home}; start the platform with `stoker up`")
    write_spec(common, comp)
    os.kill(pid, signal.SIGHUP)  # read the specs now rather than within a second


def wait_ready(common: CommonSettings, names: list[str], timeout_s: float = 60.0) -> None:
    """Return once every named component reports ready; fail early if one keeps dying or the supervisor does."""
    deadline = time.monotonic() + timeout_s
    pending = list(names)
    under_supervisor = supervisor_pid(common) is not None
    specs = set(supervised(common))
    restarts_before = {n: (restart_record(common, n) or {}).get("restarts", 0) for n in names}
    while pending:
        for name in list(pending):
            if is_ready(common, name):
                pending.remove(name)
            elif under_supervisor and name in specs:
                record = restart_record(common, name) or {}
                if record.get("state") == "backoff" and record.get("restarts", 0) - restarts_before[name] >= (
                    START_ATTEMPTS - 1
                ):
                    reason = (record.get("last_exit") or {}).get("reason", "exited")
                    raise PlatformError(
                        f"{name} {reason} {START_ATTEMPTS} times while starting. Its log:\n{log_tail(common, name)}"
                    )
            elif not alive(read_pid(common, name)):
                raise PlatformError(f"{name} exited while starting. Its log:\n{log_tail(common, name)}")
        if under_supervisor and pending and supervisor_pid(common) is None:
            raise PlatformError(f"the platform's supervisor exited. Its log:\n{_tail(platform_log(common), 30)}")
        if pending and time.monotonic() > deadline:
            tails = "\n".join(f"--- {n} ---\n{log_tail(common, n)}" for n in pending)
            raise PlatformError(f"not healthy after {timeout_s:.0f}s: {', '.join(pending)}\n{tails}")
        time.sleep(0.1)


def up(config: PlatformConfig, on_step: Callable[[str], None] | None = None) -> None:
    """Start the platform and return once every component reports healthy."""
    common = config.common
    say = on_step or (lambda _msg: None)
    already = running_components(common)
    if already or supervisor_pid(common) is not None:
        names = ", ".join(already) or "the supervisor"
        raise PlatformError(f"a platform is already running from {common.home} ({names}); run `stoker down` first")
    _forget_last_run(common)
    try:
        if config.embedded_broker:
            say(f"fetching Kafka {kafka.KAFKA_VERSION} (cached after the first time)")
            fetch_broker(common)
            say(f"starting Kafka on {common.bootstrap}")
            start_broker(common)
        say("creating topics")
        asyncio.run(ensure_topics(common.bootstrap, platform_topic_specs(common.topics, config.node_names)))
        comps = config.components()
        for comp in comps:
            write_spec(common, comp)
        say(f"starting {', '.join(c.name for c in comps)} under supervision (log: {platform_log(common)})")
        start_supervisor(common)
        wait_ready(common, [c.name for c in comps])
    except BaseException:
        down(common)
        raise


def _forget_last_run(common: CommonSettings) -> None:
    """Nothing runs: the files of an earlier run (one that did not stop cleanly) are stale."""
    if not common.run_dir.is_dir():
        return
    for pattern in ("*.pid", "*.ready", "supervisor/specs/*.json", "supervisor/state/*.json", "supervisor/pid"):
        for path in common.run_dir.glob(pattern):
            path.unlink(missing_ok=True)


def down(common: CommonSettings, timeout_s: float = STOP_TIMEOUT_S) -> list[str]:
    """Stop the supervisor (which stops what it runs), anything left, then the broker; returns what was stopped."""
    before = running_components(common)
    stopped = []
    sup = supervisor_pid(common)
    if sup is not None:
        # First, so that nothing is started again meanwhile; it stops its components itself.
        _signal_and_wait(sup, 2 * timeout_s + 5)
        stopped.append("supervisor")
    # What is still running: everything when no supervisor ran, strays when it was killed.
    left = running_components(common)
    services = [n for n in left if n != "broker"]
    for group in (
        [n for n in services if n.startswith("gateway")],
        [n for n in services if not n.startswith("gateway")],
        ["broker"] if "broker" in left else [],
    ):
        for name in group:
            signal_group(left[name], signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name in group:
            while alive(left[name]) and time.monotonic() < deadline:
                time.sleep(0.05)
            if alive(left[name]):
                signal_group(left[name], signal.SIGKILL)
    names = set(before) | set(left)
    stopped += sorted(n for n in names if n.startswith("gateway"))
    stopped += sorted(n for n in names if n != "broker" and not n.startswith("gateway"))
    stopped += ["broker"] if "broker" in names else []
    if common.run_dir.is_dir():
        for path in common.run_dir.glob("*.pid"):
            if not alive(read_pid(common, path.stem)):
                path.unlink(missing_ok=True)
                ready_file(common, path.stem).unlink(missing_ok=True)
        if supervisor_pid(common) is None:
            (supervisor_dir(common) / "pid").unlink(missing_ok=True)
    return stopped


def _signal_and_wait(pid: int, timeout_s: float) -> None:
    signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        signal_group(pid, signal.SIGKILL)
        while alive(pid) and time.monotonic() < deadline + 5:
            time.sleep(0.05)


def signal_group(pid: int, sig: int) -> None:
    """Signal a component's process group (its session), or the process alone if it has none."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    if sys.argv[1:] != ["supervise"]:
        sys.exit("usage: python -m services.cli.platform supervise")
    supervise(CommonSettings.from_env())
