"""The sandbox on a real node agent: a function sees only itself (issue 11).

Real processes throughout: a broker, the dispatcher, the gateway (listening on every address of
this host) and an agent as root with cgroups; functions that look around and try to get out,
hostile ones, and a canary that must keep answering while they do. Nothing is mocked or skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from events import FunctionSpec, InvocationCompleted, Topics
from services.common.admin import ensure_topics
from services.common.client import StokerClient, package_code
from services.common.settings import CommonSettings
from tests.helpers import RunningBroker, ServiceProcess, assert_eventually, free_ports

FNS = Path(__file__).parent / "fns"
DENIED_CONNECT = {"ECONNREFUSED", "ENETUNREACH", "EHOSTUNREACH", "TimeoutError", "EACCES", "EPERM"}


RUNTIME_0 = {"stoker.io/role": "runtime", "kubernetes.io/hostname": "runtime-0"}
RUNTIME_1 = {"stoker.io/role": "runtime", "kubernetes.io/hostname": "runtime-1"}
OUTSIDE_NET = "198.51.100."  # TEST-NET-2: a /30 of it per run for the test host in a namespace made here


@dataclass
class Node:
    settings: CommonSettings
    agent: ServiceProcess
    gateway_port: int
    listener_port: int
    host_ips: list[str]
    outside: tuple[str, int]
    outside_gw: str
    code_dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def node_dir(self) -> Path:
        return self.settings.home / "nodes" / "runtime-0"


@contextlib.contextmanager
def outside_host() -> Iterator[tuple[str, int, str]]:
    """"The outside world" for egress: a network namespace of this test with a TCP server, linked to
    the host over a veth pair (the host routes to it as it would to any outside address). Yields
    (its address, the server's port, the host's address on that link)."""
    name, link = f"sbx-out-{uuid.uuid4().hex[:6]}", f"sbxo{uuid.uuid4().hex[:6]}"
    block = 4 * random.randrange(64)
    gw, host = f"{OUTSIDE_NET}{block + 1}", f"{OUTSIDE_NET}{block + 2}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    server = None
    try:
        subprocess.run(["ip", "-batch", "-"], check=True, text=True, input=(
            f"link add {link} type veth peer name {link}p\nlink set {link}p netns {name}\n"
            f"addr add {gw}/30 dev {link}\nlink set {link} up\n"))
        subprocess.run(["ip", "-n", name, "-batch", "-"], check=True, text=True, input=(
            f"link set lo up\naddr add {host}/30 dev {link}p\nlink set {link}p up\n"
            f"route add default via {gw}\n"))
        port = 17777
        code = ("import socket\n"
                f"s = socket.create_server(('{host}', {port}))\n"
                "print('listening', flush=True)\n"
                "while True:\n"
                "    c, _ = s.accept()\n"
                "    c.sendall(b'outside')\n"
                "    c.close()\n")
        server = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-I", "-c", code],
                                  stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        yield host, port, gw
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", link], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", name], check=False)


def nft_tables() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout


def host_ipv4() -> list[str]:
    """This host's own non-loopback IPv4 addresses (where a listener on 0.0.0.0 answers)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines() if " lo " not in line]


@pytest.fixture(scope="module")
def node(kafka_broker: RunningBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    assert os.geteuid() == 0, "the sandbox is built by a root agent; these tests run as root as it does"
    prefix = f"sb{uuid.uuid4().hex[:6]}."
    home = tmp_path_factory.mktemp("home")
    settings = CommonSettings(home=home, bootstrap=kafka_broker.bootstrap, topic_prefix=prefix)
    asyncio.run(ensure_topics(settings.bootstrap, Topics(prefix).catalogue(invocation_partitions=1)))
    gateway_port, = free_ports(1)
    # A stand-in for every other platform port on this node (the agent's addresses): all addresses.
    listener = socket.create_server(("0.0.0.0", 0))
    listener_port = listener.getsockname()[1]
    dispatcher = ServiceProcess("services.dispatcher", "dispatcher", settings)
    gateway = ServiceProcess("services.gateway", "gateway", settings,
                             {"STOKER_HTTP_PORT": str(gateway_port), "STOKER_HTTP_HOST": "0.0.0.0"})
    agent = ServiceProcess("services.agent", "agent-runtime-0", settings,
                           {"STOKER_NODE_NAME": "runtime-0", "STOKER_POOL_SIZE": "1", "STOKER_MAX_INSTANCES": "6",
                            "STOKER_CGROUPS": "on"})
    outside = contextlib.ExitStack()
    other = tmp_path_factory.mktemp("reset-b-code")
    shutil.copytree(FNS / "sandbox_b", other, dirs_exist_ok=True)
    (other / "b_only.txt").write_text("only in the second function's code\n")
    try:
        out_host, out_port, out_gw = outside.enter_context(outside_host())
        dispatcher.wait_ready()
        gateway.wait_ready()
        agent.wait_ready()
        found = Node(settings, agent, gateway_port, listener_port, host_ipv4(), (out_host, out_port), out_gw)

        async def deploy() -> None:
            async with StokerClient(settings) as client:
                probe = package_code(settings, FNS / "sandbox")
                hostile = package_code(settings, FNS / "hostile")
                reset_a = package_code(settings, FNS / "sandbox_b")
                reset_b = package_code(settings, other)
                specs = [
                    FunctionSpec(name="probe", entrypoint="handler:main", source=probe),
                    FunctionSpec(name="canary", entrypoint="handler:main", source=probe),
                    FunctionSpec(name="probe-fresh", entrypoint="handler:main", source=probe, reuse="fresh"),
                    FunctionSpec(name="reset-a", entrypoint="handler:main", source=reset_a, reuse="reset"),
                    FunctionSpec(name="reset-b", entrypoint="handler:main", source=reset_b, reuse="reset"),
                    FunctionSpec(name="hostile", entrypoint="handler:main", source=hostile, timeout_s=3,
                                 memory_mb=64, pids_limit=16, max_output_bytes=64 * 1024),
                    FunctionSpec(name="egress", entrypoint="handler:main", source=probe, network="egress"),
                    FunctionSpec(name="egress-reset", entrypoint="handler:main", source=probe, network="egress",
                                 reuse="reset"),
                    FunctionSpec(name="egress-fresh", entrypoint="handler:main", source=probe, network="egress",
                                 reuse="fresh"),
                    FunctionSpec(name="probe-reset", entrypoint="handler:main", source=probe, reuse="reset"),
                ]
                for spec in specs:
                    await client.put_function(spec.model_copy(update={"node_selector": RUNTIME_0}))
                for name, source in (("hostile", hostile), ("probe", probe)):
                    assert source.digest is not None
                    found.code_dirs[name] = found.node_dir / "code" / source.digest.replace(":", "-")

        asyncio.run(deploy())
        yield found
    finally:
        listener.close()
        outside.close()
        agent.stop()
        gateway.stop()
        dispatcher.stop()
        print(agent.log()[-3000:])


def invoke(settings: CommonSettings, function: str, payload: Any) -> InvocationCompleted:
    async def go() -> InvocationCompleted:
        async with StokerClient(settings) as client:
            return await client.invoke(function, payload, timeout_s=30)

    return asyncio.run(go())


def invoke_all(settings: CommonSettings, calls: list[tuple[str, Any]]) -> list[InvocationCompleted]:
    async def go() -> list[InvocationCompleted]:
        async with StokerClient(settings) as client:
            return [await client.invoke(function, payload, timeout_s=30) for function, payload in calls]

    return asyncio.run(go())


def children_of(pid: int) -> list[tuple[int, str]]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append((int(entry), cmdline))
    return found


def test_an_instance_sees_only_its_runtime_code_and_scratch(node: Node) -> None:
    keep, fresh = invoke_all(node.settings, [("probe", {"action": "look"}), ("probe-fresh", {"action": "look"})])
    assert keep.status == "ok" and fresh.status == "ok", (keep, fresh)
    seen = keep.output
    assert seen["uid"] >= 200000 and seen["euid"] == seen["uid"] and seen["gid"] == seen["uid"], seen
    assert seen["groups"] == []
    assert fresh.output["uid"] != seen["uid"], "two instances share a uid"
    assert fresh.output["netns"] != seen["netns"], "two instances share a network namespace"
    assert set(seen["root"]) <= {"bin", "sbin", "lib", "lib64", "lib32", "libx32", "usr", "etc", "dev", "proc",
                                 "tmp", "work", "code", "root", ".empty"}, seen["root"]
    assert seen["proc"] == [str(seen["pid"])], "other processes are visible in /proc"
    assert seen["interfaces"] == [[1, "lo"]]
    assert (seen["cwd"], seen["tmp"], seen["home"], seen["hostname"]) == ("/work", "/tmp", "/work", "sandbox")
    assert seen["code"] == ["handler.py"]


def test_hostile_matrix_denied_or_terminal_while_a_canary_keeps_answering(node: Node) -> None:
    agent_pid = node.agent.proc.pid
    zygotes = [pid for pid, cmd in children_of(agent_pid) if "services.runtime.zygote" in cmd]
    assert zygotes, children_of(agent_pid)
    canary_first = invoke(node.settings, "canary", {"action": "look"})
    assert canary_first.status == "ok", canary_first
    targets = platform_targets(node)
    for name, address in targets.items():  # the ports are there: from the host they answer
        if "broker@" not in name:  # (the broker listens on loopback only)
            socket.create_connection(address, timeout=2).close()
    attempts = {
        "connect": targets,
        "read": [str(node.code_dirs["hostile"]), str(node.code_dirs["hostile"] / "handler.py"),
                 str(node.settings.home), str(node.settings.home / "artifacts"), str(node.node_dir),
                 f"/proc/{agent_pid}/root/", f"/proc/{agent_pid}/environ", f"/proc/{zygotes[0]}/root/etc/shadow",
                 "/proc/1/root/", str(Path(__file__).resolve().parents[2] / ".venv"), "/root/.stoker", "/sys/fs/cgroup",
                 "/code/../../etc/shadow", "/dev/sda"],
        "write": ["/escape", "/usr/escape", "/etc/passwd", "/code/escape", "/proc/sys/kernel/hostname",
                  str(node.settings.home / "escape"), "/dev/escape"],
        "kill": {"agent": agent_pid, "zygote": zygotes[0], "canary": canary_first.output["pid"], "init": 1},
        "import": ["aiokafka", "faststream", "services.common.settings", "orjson"],
    }
    stop = threading.Event()
    canary: list[InvocationCompleted] = []

    def keep_calling() -> None:
        async def go() -> None:
            async with StokerClient(node.settings) as client:
                while not stop.is_set():
                    canary.append(await client.invoke("canary", {"action": "look"}, timeout_s=30))

        asyncio.run(go())

    thread = threading.Thread(target=keep_calling, name="canary")
    thread.start()
    try:
        got = invoke(node.settings, "probe", {"action": "attempts", **attempts})
        terminal = {action: invoke(node.settings, "hostile", {"action": action})
                    for action in ("fork-bomb", "balloon", "spin", "flood", "suicide")}
        after = invoke(node.settings, "hostile", {"action": "ok"})
        assert_eventually(lambda: len(canary) >= 5, message="canary calls")
    finally:
        stop.set()
        thread.join(60)
    assert got.status == "ok", got
    results = got.output
    print("\n".join(f"{k}: {v}" for k, v in results.items()))
    for name in targets:
        assert results[f"connect {name}"] in DENIED_CONNECT, (name, results[f"connect {name}"])
    for path in attempts["read"]:
        assert results[f"read {path}"] in {"ENOENT", "EACCES", "EPERM"}, (path, results[f"read {path}"])
    for path in attempts["write"]:
        assert results[f"write {path}"] in {"EROFS", "EACCES", "ENOENT", "EPERM"}, (path, results[f"write {path}"])
    for name in attempts["kill"]:
        assert results[f"kill {name}"] in {"ESRCH", "EPERM"}, (name, results[f"kill {name}"])
        assert results[f"ptrace {name}"] in {"ESRCH", "EPERM"}, (name, results[f"ptrace {name}"])
    for module in ("aiokafka", "faststream", "services.common.settings"):
        assert results[f"import {module}"] == "ModuleNotFoundError", (module, results)
    kinds = {action: (r.status, r.error.kind if r.error else None) for action, r in terminal.items()}
    assert kinds == {"fork-bomb": ("error", "pids_limit"), "balloon": ("error", "oom_killed"),
                     "spin": ("timeout", "timeout"), "flood": ("error", "output_truncated"),
                     "suicide": ("error", "instance_died")}, kinds
    assert after.status == "ok", after
    assert node.agent.proc.poll() is None, "the agent died"
    assert all(os.path.exists(f"/proc/{pid}") for pid in zygotes), "the zygote died"
    assert canary and all(r.status == "ok" for r in canary), [r for r in canary if r.status != "ok"]


def test_reset_lets_nothing_cross_between_two_functions_on_one_instance(node: Node) -> None:
    shared = 0
    for _ in range(8):  # the pool may hand either its reset instance or a fresh one to the second call
        left, found = invoke_all(node.settings, [("reset-a", {"action": "leave"}), ("reset-b", {"action": "find"})])
        assert left.status == "ok" and found.status == "ok", (left, found)
        seen = found.output
        assert seen["work"] == [] and seen["tmp"] == [] and seen["shm"] == [], seen
        assert seen["env"] is None and seen["path"] == [] and seen["modules"] == [], seen
        assert seen["cwd"] == "/work" and seen["module_state"] == [], seen
        assert seen["code"] == ["b_only.txt", "handler.py"], seen  # its own code, not the first's
        if found.instance == left.instance:
            assert (seen["pid"], seen["uid"]) == (left.output["pid"], left.output["uid"])  # the same process
            shared += 1
            if shared >= 2:
                break
    assert shared, "the second function never ran on the first one's reset instance"


def test_nothing_is_left_behind_when_an_instance_is_gone(node: Node) -> None:
    result = invoke(node.settings, "probe-fresh", {"action": "look"})
    assert result.status == "ok" and result.instance, result
    iid, uid, netns = result.instance, result.output["uid"], result.output["netns"]
    box = node.node_dir / "instances" / iid

    def gone() -> bool:
        assert not box.exists(), f"{box} is still there"
        assert str(node.node_dir) not in Path("/proc/self/mountinfo").read_text(), "a mount is on the host"
        mounts = Path("/proc/self/mountinfo").read_text()
        assert iid not in mounts, "a mount of the instance is left"
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                status = Path(f"/proc/{entry}/status").read_text()
                ns = os.stat(f"/proc/{entry}/ns/net").st_ino
            except OSError:
                continue
            assert f"\nUid:\t{uid}\t" not in status, f"process {entry} of the instance's uid is left"
            assert ns != netns, f"process {entry} is left in the instance's network namespace"
        for root, dirs, _files in os.walk("/sys/fs/cgroup"):
            assert iid not in dirs, f"cgroup {root}/{iid} is left"
        return True

    assert_eventually(gone, timeout_s=15, message="the instance's sandbox removed")


def platform_targets(node: Node) -> dict[str, tuple[str, int]]:
    broker_host, broker_port = node.settings.bootstrap.rsplit(":", 1)
    targets = {"broker": (broker_host, int(broker_port)), "gateway": ("127.0.0.1", node.gateway_port),
               "node port": ("127.0.0.1", node.listener_port)}
    for ip in [*node.host_ips, node.outside_gw]:
        targets |= {f"broker@{ip}": (ip, int(broker_port)), f"gateway@{ip}": (ip, node.gateway_port),
                    f"node port@{ip}": (ip, node.listener_port)}
    return targets


def test_egress_reaches_the_outside_but_never_the_platform(node: Node) -> None:
    targets = platform_targets(node)
    with socket.create_connection(node.outside, timeout=2) as conn:  # the host itself reaches it
        assert conn.recv(16) == b"outside"
    socket.create_connection((node.outside_gw, node.gateway_port), timeout=2).close()  # the gateway is on it
    got = invoke(node.settings, "egress", {"action": "attempts", "connect": {"outside": node.outside, **targets}})
    look = invoke(node.settings, "egress", {"action": "look"})
    assert got.status == "ok" and look.status == "ok", (got, look)
    print("\n".join(f"{k}: {v}" for k, v in got.output.items()))
    assert got.output["connect outside"] == "connected", got.output
    gateway_of_its_link = "10.200." + ".".join(str(x) for x in divmod(4 * (look.output["uid"] - 200000) + 1, 256))
    own = invoke(node.settings, "egress", {"action": "attempts", "connect": {
        "its link's host side": (gateway_of_its_link, node.gateway_port)}})
    for name, result in {**got.output, **own.output}.items():
        if name != "connect outside":
            assert result in DENIED_CONNECT, (name, result)
    assert sorted(name for _, name in look.output["interfaces"]) == ["eth0", "lo"]
    # A function without egress: the same outside address is not even routable.
    none = invoke(node.settings, "probe", {"action": "attempts", "connect": {"outside": node.outside}})
    assert none.output["connect outside"] in {"ENETUNREACH", "EHOSTUNREACH"}, none.output


def test_reset_takes_egress_away_before_another_function_gets_the_instance(node: Node) -> None:
    shared = 0
    for _ in range(8):
        first, second = invoke_all(node.settings, [
            ("egress-reset", {"action": "attempts", "connect": {"outside": node.outside}}),
            ("probe-reset", {"action": "attempts", "connect": {"outside": node.outside}}),
        ])
        assert first.output["connect outside"] == "connected", first
        assert second.output["connect outside"] in {"ENETUNREACH", "EHOSTUNREACH"}, second
        if first.instance == second.instance:
            shared += 1
            if shared >= 2:
                break
    assert shared, "the second function never ran on the egress function's reset instance"


def test_an_egress_instance_leaves_no_link_behind(node: Node) -> None:
    result = invoke(node.settings, "egress-fresh", {"action": "look"})
    assert result.status == "ok", result
    link = f"sk{result.output['uid']}"

    def gone() -> bool:
        shown = subprocess.run(["ip", "link", "show", link], capture_output=True, text=True)
        assert shown.returncode != 0, shown.stdout
        return True

    assert_eventually(gone, timeout_s=15, message=f"{link} removed")


# --------------------------------------------------------------------------- without a zygote, and after a crash


@pytest.fixture(scope="module")
def spawn_node(node: Node) -> Iterator[ServiceProcess]:
    """A second agent (runtime-1) without a zygote: its instances are spawned interpreters that
    confine themselves. Functions pinned to it by hostname."""
    agent = ServiceProcess("services.agent", "agent-runtime-1", node.settings,
                           {"STOKER_NODE_NAME": "runtime-1", "STOKER_POOL_SIZE": "1", "STOKER_MAX_INSTANCES": "3",
                            "STOKER_CGROUPS": "on", "STOKER_ZYGOTE": "off"})
    try:
        agent.wait_ready()

        async def deploy() -> None:
            async with StokerClient(node.settings) as client:
                probe = package_code(node.settings, FNS / "sandbox")
                await client.put_function(FunctionSpec(name="probe-spawn", entrypoint="handler:main", source=probe,
                                                       node_selector=RUNTIME_1))

        asyncio.run(deploy())
        yield agent
    finally:
        agent.stop()
        print(agent.log()[-3000:])


def test_spawned_instances_are_sandboxed_the_same_way(node: Node, spawn_node: ServiceProcess) -> None:
    result = invoke(node.settings, "probe-spawn", {"action": "look"})
    assert result.status == "ok" and result.node == "runtime-1", result
    assert result.start in ("pool", "spawn"), result.start
    seen = result.output
    assert seen["uid"] >= 200000 and seen["groups"] == [], seen
    assert seen["proc"] == [str(seen["pid"])] and seen["interfaces"] == [[1, "lo"]], seen["proc_stat"]
    assert "work" in seen["root"] and "code" in seen["root"] and seen["code"] == ["handler.py"], seen
    attempts = invoke(node.settings, "probe-spawn", {"action": "attempts", "import": ["aiokafka"],
                                                     "connect": {"broker": platform_targets(node)["broker"]}})
    assert attempts.output == {"connect broker": "ECONNREFUSED", "import aiokafka": "ModuleNotFoundError"}, attempts


def test_a_crashed_agents_sandboxes_are_removed_by_the_next_one(node: Node, spawn_node: ServiceProcess) -> None:
    before = invoke(node.settings, "probe-spawn", {"action": "look"})
    assert before.status == "ok" and before.instance, before
    old_uid, old_iid = before.output["uid"], before.instance  # (the uid may be handed out again, once free)
    instances = node.settings.home / "nodes" / "runtime-1" / "instances"
    assert (instances / old_iid).is_dir()
    killed_pid = spawn_node.proc.pid
    assert f"-runtime-1-{killed_pid}" in nft_tables()
    spawn_node.kill()  # SIGKILL: no shutdown, its instances die with it (parent-death signal)
    # Its mounts were in its own mount namespace, gone with it: the host never had any.
    assert old_iid not in Path("/proc/self/mountinfo").read_text(), "a crashed agent's mount is on the host"
    assert str(instances) not in Path("/proc/self/mountinfo").read_text()
    spawn_node.ready_file.unlink()  # the killed agent's; the restarted one writes its own
    restarted = ServiceProcess("services.agent", "agent-runtime-1", node.settings,
                               {"STOKER_NODE_NAME": "runtime-1", "STOKER_POOL_SIZE": "1", "STOKER_MAX_INSTANCES": "3",
                                "STOKER_CGROUPS": "on", "STOKER_ZYGOTE": "off"})
    spawn_node.proc = restarted.proc  # the fixture stops whichever runs now
    restarted.wait_ready()
    assert not (instances / old_iid).exists(), "the crashed agent's instance folder is left"
    tables = nft_tables()
    assert f"-runtime-1-{spawn_node.proc.pid}" in tables and f"-runtime-1-{killed_pid}" not in tables, tables
    assert f"-runtime-0-{node.agent.proc.pid}" in tables, "another agent's crash took runtime-0's table"
    assert old_iid not in Path("/proc/self/mountinfo").read_text(), "the crashed agent's mounts are left"

    old_proc = Path(f"/proc/{before.output['pid']}")
    assert_eventually(lambda: not old_proc.exists() or old_proc.stat().st_uid != old_uid,
                      message="the crashed agent's instance process gone")
    after = invoke(node.settings, "probe-spawn", {"action": "look"})
    assert after.status == "ok" and after.instance != old_iid, after
