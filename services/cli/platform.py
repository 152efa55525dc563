"""The embedded platform: start, watch and stop the broker and every service as local processes.

Each component runs in its own session with its pid in ``<home>/run/<name>.pid`` and its log in
``<home>/logs/<name>.log``; it reports healthy by writing ``<home>/run/<name>.ready``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.cli import broker as kafka
from services.cli.topics import platform_topic_specs
from services.common.admin import ensure_topics
from services.common.settings import CommonSettings

REPO_ROOT = Path(__file__).resolve().parents[2]


class PlatformError(RuntimeError):
    """The platform could not be started or stopped; the message says why and where to look."""


@dataclass(frozen=True)
class Component:
    name: str
    module: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PlatformConfig:
    common: CommonSettings
    embedded_broker: bool = True
    http_port: int = 8080
    nodes: int = 2
    """Runtime nodes (tainted ``stoker.io/dedicated=runtime:NoSchedule``)."""
    isolated: int = 1
    """Isolation nodes (tainted ``stoker.io/dedicated=isolated:NoSchedule``): where outliers go."""
    pool_size: int = 2

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
        comps = [
            Component("dispatcher", "services.dispatcher", on_management),
            Component("poolmgr", "services.poolmgr", {"STOKER_POOL_SIZE": str(self.pool_size), **on_management}),
            Component("builder", "services.builder", on_management),
            Component("throttler", "services.throttler", on_management),
            Component("workflow", "services.workflow", on_management),
        ]
        comps += [self.agent(n, n.rsplit("-", 1)[0]) for n in self.node_names]
        comps.append(
            Component("gateway", "services.gateway", {"STOKER_HTTP_PORT": str(self.http_port), **on_management})
        )
        return comps


def pid_path(common: CommonSettings, name: str) -> Path:
    return common.run_dir / f"{name}.pid"


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


def running_components(common: CommonSettings) -> dict[str, int]:
    """Every component with a pid file whose process is alive."""
    found: dict[str, int] = {}
    if common.run_dir.is_dir():
        for path in sorted(common.run_dir.glob("*.pid")):
            pid = read_pid(common, path.stem)
            if pid is not None and alive(pid):
                found[path.stem] = pid
    return found


def is_ready(common: CommonSettings, name: str) -> bool:
    return (common.run_dir / f"{name}.ready").exists() and alive(read_pid(common, name))


def ready_facts(common: CommonSettings, name: str) -> dict[str, object]:
    """What a component wrote in its ready file (pid, node, ...), or nothing."""
    import orjson

    try:
        facts = orjson.loads((common.run_dir / f"{name}.ready").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return facts if isinstance(facts, dict) else {}


def log_tail(common: CommonSettings, name: str, lines: int = 30) -> str:
    try:
        text = (common.logs_dir / f"{name}.log").read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


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


def start_component(config: PlatformConfig, comp: Component) -> int:
    common = config.common
    common.run_dir.mkdir(parents=True, exist_ok=True)
    common.logs_dir.mkdir(parents=True, exist_ok=True)
    (common.run_dir / f"{comp.name}.ready").unlink(missing_ok=True)
    env = {
        **os.environ,
        "STOKER_HOME": str(common.home),
        "STOKER_BOOTSTRAP": common.bootstrap,
        "STOKER_TOPIC_PREFIX": common.topic_prefix,
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
    return proc.pid


def wait_ready(common: CommonSettings, names: list[str], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(names)
    while pending:
        for name in list(pending):
            if is_ready(common, name):
                pending.remove(name)
            elif not alive(read_pid(common, name)):
                raise PlatformError(f"{name} exited while starting. Its log:\n{log_tail(common, name)}")
        if pending and time.monotonic() > deadline:
            tails = "\n".join(f"--- {n} ---\n{log_tail(common, n)}" for n in pending)
            raise PlatformError(f"not healthy after {timeout_s:.0f}s: {', '.join(pending)}\n{tails}")
        time.sleep(0.1)


def up(config: PlatformConfig, on_step: Callable[[str], None] | None = None) -> None:
    """Start the platform and return once every component reports healthy."""
    common = config.common
    say = on_step or (lambda _msg: None)
    already = running_components(common)
    if already:
        raise PlatformError(
            f"a platform is already running from {common.home} ({', '.join(already)}); run `stoker down` first"
        )
    try:
        if config.embedded_broker:
            say(f"fetching Kafka {kafka.KAFKA_VERSION} (cached after the first time)")
            fetch_broker(common)
            say(f"starting Kafka on {common.bootstrap}")
            start_broker(common)
        say("creating topics")
        asyncio.run(ensure_topics(common.bootstrap, platform_topic_specs(common.topics, config.node_names)))
        comps = config.components()
        say(f"starting {', '.join(c.name for c in comps)}")
        for comp in comps:
            start_component(config, comp)
        wait_ready(common, [c.name for c in comps])
    except BaseException:
        down(common)
        raise


def down(common: CommonSettings, timeout_s: float = 20.0) -> list[str]:
    """Stop every component (services first, the broker last); returns what was stopped."""
    stopped = []
    running = running_components(common)
    order = [n for n in running if n.startswith("gateway")] + [
        n for n in running if n not in ("broker",) and not n.startswith("gateway")
    ]
    for group in (order, ["broker"] if "broker" in running else []):
        for name in group:
            _signal_group(running[name], signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name in group:
            while alive(running[name]) and time.monotonic() < deadline:
                time.sleep(0.05)
            if alive(running[name]):
                _signal_group(running[name], signal.SIGKILL)
            stopped.append(name)
    if common.run_dir.is_dir():
        for path in common.run_dir.glob("*.pid"):
            if not alive(read_pid(common, path.stem)):
                path.unlink(missing_ok=True)
                (common.run_dir / f"{path.stem}.ready").unlink(missing_ok=True)
    return stopped


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
