"""The ``stoker`` command."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import orjson
import typer
from rich.console import Console
from rich.table import Column, Table

from events import (
    FunctionSpec,
    PlacementOverride,
    Record,
    RepoConfigured,
    Taint,
    Toleration,
)
from events.codec import DecodeError, loads
from services.agent.settings import parse_taints
from services.cli import platform
from services.cli import tokens as token_cli
from services.cli import triggers as trigger_cli
from services.cli.backend import Backend, Direct, backend_for, package
from services.cli.broker import BrokerError, platform_broker_is_reachable
from services.common import operations
from services.common.admin import ensure_topics
from services.common.artifacts import ArtifactError
from services.common.client import StokerClient, package_code
from services.common.kafkasec import KafkaUnreachable
from services.common.settings import CommonSettings

app = typer.Typer(
    help="Stoker: a private functions-as-a-service platform on Kafka.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _global(
    direct: Annotated[
        bool,
        typer.Option(
            "--direct",
            help="Manage over Kafka instead of the gateway's API (the platform operator's path; needs broker access).",
        ),
    ] = False,
) -> None:
    """Management commands use the gateway's API ($STOKER_API_URL) with $STOKER_TOKEN or the admin token that
    `stoker up` keeps in the state folder; --direct (or STOKER_DIRECT=1) writes the topics instead."""
    if direct:
        os.environ["STOKER_DIRECT"] = "1"


fn_app = typer.Typer(help="Create, change, inspect and invoke functions.", no_args_is_help=True)
app.add_typer(fn_app, name="fn")
app.add_typer(trigger_cli.app, name="trigger")
app.add_typer(token_cli.app, name="token")
console = Console()
err = Console(stderr=True)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "examples" / "hello"


def settings(bootstrap: str | None = None) -> CommonSettings:
    common = CommonSettings.from_env()
    if bootstrap:
        common = CommonSettings(
            home=common.home,
            bootstrap=bootstrap,
            topic_prefix=common.topic_prefix,
            otlp_endpoint=common.otlp_endpoint,
            log_level=common.log_level,
            kafka=common.kafka,
        )
    return common


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _require_broker(common: CommonSettings) -> None:
    if not platform_broker_is_reachable(common.bootstrap):
        raise fail(f"no Kafka broker answers at {common.bootstrap}; start the platform with `stoker up`")


# ----- platform -----------------------------------------------------------------------------------


@app.command()
def setup() -> None:
    """Fetch the Kafka server jars from Maven Central (once; cached in the state folder)."""
    try:
        libs = platform.fetch_broker(settings())
    except BrokerError as exc:
        raise fail(str(exc)) from None
    console.print(f"Kafka jars ready in {libs}")


@app.command()
def up(
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Return once healthy; stop with `stoker down`.")
    ] = False,
    bootstrap: Annotated[
        Optional[str], typer.Option(help="Use this Kafka (HOST:PORT) instead of starting one.")
    ] = None,
    nodes: Annotated[int, typer.Option(help="Runtime nodes (node agents) to start.", min=1, max=16)] = 2,
    isolated: Annotated[int, typer.Option(help="Isolation nodes for throttled functions.", min=0, max=8)] = 1,
    pool_size: Annotated[int, typer.Option(help="Generic instances per node.", min=0, max=64)] = 2,
    http_port: Annotated[Optional[int], typer.Option(help="Gateway port (default $STOKER_HTTP_PORT or 8080).")] = None,
    console_port: Annotated[
        Optional[int], typer.Option(help="Web console port (default $STOKER_CONSOLE_PORT or 8081).")
    ] = None,
    example: Annotated[bool, typer.Option(help="Deploy and invoke examples/hello once up.")] = True,
    dispatchers: Annotated[
        int, typer.Option(help="Dispatcher processes (dispatcher-0 … when more than one).", min=1, max=8)
    ] = 1,
    poolmgrs: Annotated[int, typer.Option(help="Pool manager processes.", min=1, max=8)] = 1,
    workflow_engines: Annotated[int, typer.Option(help="Workflow engine processes.", min=1, max=8)] = 1,
) -> None:
    """Start the embedded platform: Kafka, the services, a management node, runtime and isolation nodes.

    A supervisor starts every service and node agent again when it dies (log: <home>/logs/platform.log);
    `stoker status` shows each one's restarts."""
    common = settings(bootstrap)
    port = http_port or int(os.environ.get("STOKER_HTTP_PORT") or 8080)
    config = platform.PlatformConfig(
        common=common,
        embedded_broker=bootstrap is None,
        http_port=port,
        console_port=console_port or int(os.environ.get("STOKER_CONSOLE_PORT") or 8081),
        nodes=nodes,
        isolated=isolated,
        pool_size=pool_size,
        dispatchers=dispatchers,
        poolmgrs=poolmgrs,
        workflow_engines=workflow_engines,
    )
    started = time.monotonic()
    try:
        platform.up(config, on_step=lambda msg: console.print(f"[dim]•[/dim] {msg}"))
    except (platform.PlatformError, BrokerError) as exc:
        raise fail(str(exc)) from None
    console.print(
        f"[green]Stoker is up[/green] in {time.monotonic() - started:.1f}s "
        f"(state in {common.home}, Kafka at {common.bootstrap})"
    )
    token, made = asyncio.run(token_cli.ensure_admin_token(common))
    where = token_cli.admin_token_path(common)
    console.print(
        f"admin token ({'new; ' if made else ''}kept in {where}, mode 0600): [bold]{token}[/bold]", soft_wrap=True
    )
    if example and EXAMPLE.is_dir():
        _run_example(common)
    console.print(
        f'HTTP API: [bold]http://127.0.0.1:{port}[/bold]  (try: curl -H "Authorization: Bearer $(cat {where})" '
        f'-d \'{{"name": "you"}}\' http://127.0.0.1:{port}/fn/hello)',
        soft_wrap=True,
    )
    console.print(f"Web console: [bold]http://127.0.0.1:{port}/console[/bold]")
    if detach:
        console.print("Running in the background; `stoker status` to look, `stoker down` to stop.")
        return
    console.print("Press Ctrl-C to stop.")
    stop = {"now": False}

    def on_signal(_sig: int, _frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    seen: dict[str, float] = {}  # when each component's last exit was reported
    while not stop["now"]:
        time.sleep(0.5)
        if platform.supervisor_pid(common) is None:
            err.print(f"[red]the supervisor exited[/red]; see {platform.platform_log(common)}")
            break
        for name in platform.supervised(common):
            last = (platform.restart_record(common, name) or {}).get("last_exit")
            if last and last["at"] != seen.get(name):
                seen[name] = last["at"]
                err.print(
                    f"[yellow]{name} {last['reason']}[/yellow] after {last['uptime_s']}s up; it is started again "
                    f"(see {platform.platform_log(common)})"
                )
    console.print("stopping…")
    platform.down(common)
    console.print("stopped.")


def _run_example(common: CommonSettings) -> None:
    async def go() -> Any:
        async with StokerClient(common) as client:
            source = package_code(common, EXAMPLE)
            await client.put_function(FunctionSpec(name="hello", entrypoint="handler:main", source=source))
            return await client.invoke("hello", {"name": "Stoker"}, timeout_s=30)

    result = asyncio.run(go())
    console.print(f"deployed [bold]hello[/bold] from {EXAMPLE.relative_to(REPO_ROOT)}; invoked it:")
    print_json(result.model_dump(mode="json", exclude_none=True))


@app.command()
def down() -> None:
    """Stop a platform started with `stoker up` (no process is left behind)."""
    common = settings()
    stopped = platform.down(common)
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Broker, services, nodes with their instances, and functions."""
    common = settings()
    reachable = platform_broker_is_reachable(common.bootstrap)
    running = platform.running_components(common)
    services = platform.services_status(common)
    report: dict[str, Any] = {
        "broker": {"bootstrap": common.bootstrap, "reachable": reachable, "embedded_pid": running.get("broker")},
        "supervisor": {"pid": platform.supervisor_pid(common), "log": str(platform.platform_log(common))},
        "services": services,
        "nodes": {},
        "functions": {},
        "isolations": {},
        "throttle_decisions": [],
    }
    if reachable:

        async def views() -> tuple[dict[str, Any], dict[str, FunctionSpec], dict[str, Any], list[Any]]:
            async with StokerClient(common) as client:
                # Four views of the client's one reader, read side by side.
                return await asyncio.gather(
                    client.nodes(),
                    client.functions(),
                    client.table(common.topics.placement, PlacementOverride),
                    client.history(common.topics.throttle),
                )

        nodes, functions, overrides, decisions = asyncio.run(views())
        for name, override in sorted(overrides.items()):
            if override.active(int(time.time() * 1000)):
                report["isolations"][name] = override.model_dump(mode="json", exclude={"type", "version"})
        report["throttle_decisions"] = [d.model_dump(mode="json", exclude={"type", "version"}) for d in decisions[-10:]]
        now = time.time() * 1000
        for name, rec in sorted(nodes.items()):
            if rec.type not in ("node.heartbeat", "node.stopped"):
                continue  # node.observed (from Kubernetes) adds nothing an agent's heartbeat does not show
            entry: dict[str, Any] = {"type": rec.type, "incarnation": rec.incarnation}
            if rec.type == "node.heartbeat":
                hb: Any = rec
                entry.update(
                    up=hb.fresh(int(now)),
                    last_seen_s=round((now - hb.at_ms) / 1000, 1),
                    labels=hb.labels,
                    taints=[f"{t.key}={t.value}:{t.effect}" for t in hb.taints],
                    unschedulable=hb.unschedulable,
                    in_flight=hb.in_flight,
                    pool_target=hb.pool_target,
                    instances=[i.model_dump(mode="json") for i in hb.instances],
                )
            else:
                entry["up"] = False
            report["nodes"][name] = entry
        for name, spec in sorted(functions.items()):
            holding = sum(
                1
                for entry in report["nodes"].values()
                if entry.get("up")
                for i in entry.get("instances", [])
                if i.get("function") == name
                and i.get("function_version") == spec.code_version
                and i.get("state") in ("ready", "busy")
            )
            report["functions"][name] = {
                "active_version": spec.code_version if spec.source.digest else None,
                "source": spec.source.kind,
                "instances_holding_active": holding,
                "version": spec.code_version,
                "revision": spec.revision,
                "entrypoint": spec.entrypoint,
                "reuse": spec.reuse,
            }
        report["triggers"] = trigger_cli.status_section(common)
    if as_json:
        print_json(report)
        return
    broker_line = "[green]reachable[/green]" if reachable else "[red]unreachable[/red]"
    console.print(
        f"broker {common.bootstrap}: {broker_line}"
        + (f" (embedded, pid {running['broker']})" if "broker" in running else "")
    )
    table = Table(
        Column("service", no_wrap=True), "pid", "ready", "node", "up for", "restarts", "last exit", title="services"
    )
    for name, info in services.items():
        last = info.get("last_exit")
        table.add_row(
            name,
            str(info["pid"] or "-"),
            "yes" if info["ready"] else "no",
            str(info.get("node") or "-"),
            _duration(info["uptime_s"]) if info.get("uptime_s") is not None else info["state"],
            str(info["restarts"]),
            f"{last['signal'] or 'exit ' + str(last['exit_code'])}, {_duration(time.time() - last['at'])} ago"
            if last
            else "-",
        )
    console.print(table)
    table = Table("node", "up", "role / taints", "instances (state: function@version)", "in flight", title="nodes")
    for name, entry in report["nodes"].items():
        insts = ", ".join(
            f"{i['state']}" + (f":{i['function']}@{i['function_version']}" if i.get("function") else "")
            for i in entry.get("instances", [])
        )
        role = (entry.get("labels") or {}).get("stoker.io/role", "-")
        marks = " ".join(entry.get("taints", [])) + (" cordoned" if entry.get("unschedulable") else "")
        up = "yes" if entry["up"] else "no"
        table.add_row(name, up, f"{role} {marks}".strip(), insts or "-", str(entry.get("in_flight", 0)))
    console.print(table)
    if report["isolations"]:
        table = Table("function", "until", "by", "reason", title="isolated functions")
        for name, iso in report["isolations"].items():
            until = time.strftime("%H:%M:%S", time.localtime(iso["until_ms"] / 1000)) if iso.get("until_ms") else "-"
            table.add_row(name, until, iso.get("by", ""), iso.get("reason", ""))
        console.print(table)
    if report["throttle_decisions"]:
        table = Table("at", "function", "action", "where", "rule", title="recent throttle decisions")
        for d in report["throttle_decisions"]:
            table.add_row(
                time.strftime("%H:%M:%S", time.localtime(d["at_ms"] / 1000)),
                d["function"],
                d["action"],
                f"{d.get('node') or ''} {d.get('instance') or ''}".strip(),
                d["rule"],
            )
        console.print(table)
    table = Table(
        "function", "source", "active version", "loaded in", "revision", "entrypoint", "reuse", title="functions"
    )
    for name, fn in report["functions"].items():
        table.add_row(
            name,
            fn["source"],
            fn["active_version"] or "(not built)",
            f"{fn['instances_holding_active']} instance(s)",
            str(fn["revision"]),
            fn["entrypoint"],
            fn["reuse"],
        )
    console.print(table)
    trigger_cli.print_rows(report.get("triggers", {}))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


# ----- functions -----------------------------------------------------------------------------------


def _parse_env(pairs: list[str] | None) -> dict[str, str]:
    env = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise fail(f"--env takes KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def _placement_options(selector: list[str] | None, tolerations: list[str] | None) -> dict[str, Any]:
    """``--node-selector`` and ``--toleration`` as spec fields (only those given)."""
    out: dict[str, Any] = {}
    if selector:
        pairs = dict(_parse_env(selector))
        out["node_selector"] = pairs
    if tolerations:
        parsed = []
        for text in tolerations:
            key_value, _, effect = text.partition(":")
            key, sep, value = key_value.partition("=")
            parsed.append(Toleration(key=key, operator="Equal" if sep else "Exists", value=value, effect=effect))  # type: ignore[arg-type]
        out["tolerations"] = parsed
    return out


T = TypeVar("T")


def _with_client(common: CommonSettings, work: Callable[[StokerClient], Awaitable[T]]) -> T:
    """Run one piece of async work with a connected client: each command is one short session."""

    async def go() -> T:
        async with StokerClient(common) as client:
            return await work(client)

    return asyncio.run(go())


def _manage(common: CommonSettings, work: Callable[[Backend], Awaitable[T]]) -> T:
    """One management command, through the gateway's API with a token (or Kafka with --direct); a refusal
    is the command's error."""
    backend = backend_for(common)
    if isinstance(backend, Direct):
        _require_broker(common)

    async def go() -> T:
        async with backend as b:
            return await work(b)

    try:
        return asyncio.run(go())
    except operations.WorkflowRefused:
        raise
    except (operations.Refused, KafkaUnreachable) as exc:
        raise fail(str(exc)) from None


def _current(common: CommonSettings, name: str) -> FunctionSpec | None:
    return _manage(common, lambda b: b.functions()).get(name)


def _publish(common: CommonSettings, record: Record, topic: str, key: str) -> None:
    _with_client(common, lambda c: c.send(record, topic, key))


@fn_app.command("create")
def fn_create(
    name: str,
    entrypoint: Annotated[str, typer.Option(help="module:function, e.g. handler:main.")],
    code: Annotated[
        Optional[Path], typer.Option(help="Directory with the function's code.", exists=True, file_okay=False)
    ] = None,
    git: Annotated[Optional[str], typer.Option(help="Repository URL (file://, ssh:// or https://).")] = None,
    branch: Annotated[str, typer.Option(help="Branch to build (with --git).")] = "main",
    path: Annotated[str, typer.Option(help="Folder of the function in the repository (with --git).")] = "",
    prewarm_on_commit: Annotated[int, typer.Option(help="Instances loaded before a new commit goes live.")] = 1,
    node_selector: Annotated[
        Optional[list[str]], typer.Option(help="key=value a node must carry (default stoker.io/role=runtime).")
    ] = None,
    toleration: Annotated[
        Optional[list[str]], typer.Option(help="key[=value][:Effect] of a taint to tolerate (runtime by default).")
    ] = None,
    runtime: Annotated[str, typer.Option(help="Runtime.")] = "python3.11",
    memory: Annotated[int, typer.Option(help="Memory limit in MB.")] = 256,
    timeout: Annotated[float, typer.Option(help="Timeout in seconds.")] = 30.0,
    concurrency: Annotated[int, typer.Option(help="Most invocations in flight at once.")] = 100,
    idle_s: Annotated[
        Optional[float], typer.Option(help="Keep-alive of an idle instance, seconds (default: the policy's).")
    ] = None,
    reuse: Annotated[str, typer.Option(help="Instance reuse: keep, reset or fresh.")] = "keep",
    cpu: Annotated[int, typer.Option(help="CPU quota in millicores.")] = 1000,
    pids: Annotated[int, typer.Option(help="Most processes and threads per instance.")] = 64,
    network: Annotated[
        str, typer.Option(help="none (its own loopback only) or egress (the outside, never the platform).")
    ] = "none",
    env: Annotated[Optional[list[str]], typer.Option(help="KEY=VALUE for the function's environment.")] = None,
    public: Annotated[bool, typer.Option(help="Anyone may invoke it over HTTP, without a token.")] = False,
) -> None:
    """Create a function from a directory of code (--code) or bound to a git branch (--git)."""
    common = settings()
    if (code is None) == (git is None):
        raise fail("give exactly one of --code DIR or --git URL")
    if _current(common, name) is not None:
        raise fail(f"function {name!r} exists; use `stoker fn update`")
    fields: dict[str, Any] = {
        "name": name,
        "entrypoint": entrypoint,
        "runtime": runtime,
        "memory_mb": memory,
        "timeout_s": timeout,
        "concurrency": concurrency,
        "env": _parse_env(env),
        "prewarm_on_commit": prewarm_on_commit,
        **_placement_options(node_selector, toleration),
        "reuse": reuse,
        "cpu_millis": cpu,
        "pids_limit": pids,
        "network": network,
        "public": public,
    }
    if idle_s is not None:
        fields["idle_s"] = idle_s
    try:
        archive = package(code) if code is not None else None
    except ArtifactError as exc:
        raise fail(str(exc)) from None
    repo = {"url": git, "branch": branch, "path": path} if git is not None else None
    spec = _manage(common, lambda b: b.create_function(fields, archive, repo))
    if spec.source.kind == "archive":
        console.print(f"created [bold]{name}[/bold] version {spec.code_version} ({spec.source.size} bytes)")
        return
    console.print(
        f"created [bold]{name}[/bold] bound to {git} {branch}:{path or '/'}; building the branch head "
        f"(`stoker fn builds {name}`)"
    )


@fn_app.command("update")
def fn_update(
    name: str,
    code: Annotated[Optional[Path], typer.Option(exists=True, file_okay=False)] = None,
    entrypoint: Annotated[Optional[str], typer.Option()] = None,
    memory: Annotated[Optional[int], typer.Option()] = None,
    timeout: Annotated[Optional[float], typer.Option()] = None,
    concurrency: Annotated[Optional[int], typer.Option()] = None,
    idle_s: Annotated[Optional[float], typer.Option()] = None,
    reuse: Annotated[Optional[str], typer.Option(help="keep, reset or fresh.")] = None,
    cpu: Annotated[Optional[int], typer.Option(help="CPU quota in millicores.")] = None,
    pids: Annotated[Optional[int], typer.Option(help="Most processes and threads per instance.")] = None,
    network: Annotated[Optional[str], typer.Option(help="none or egress.")] = None,
    node_selector: Annotated[Optional[list[str]], typer.Option(help="key=value (replaces the selector).")] = None,
    toleration: Annotated[Optional[list[str]], typer.Option(help="key[=value][:Effect] (replaces them).")] = None,
    env: Annotated[Optional[list[str]], typer.Option()] = None,
    public: Annotated[Optional[bool], typer.Option("--public/--private", help="Invocable without a token?")] = None,
) -> None:
    """Change a function: new code and/or settings (a new revision)."""
    common = settings()
    changes: dict[str, Any] = {}
    try:
        archive = package(code) if code is not None else None
        for key, value in (
            ("entrypoint", entrypoint),
            ("memory_mb", memory),
            ("timeout_s", timeout),
            ("concurrency", concurrency),
            ("idle_s", idle_s),
            ("reuse", reuse),
            ("cpu_millis", cpu),
            ("pids_limit", pids),
            ("network", network),
            ("public", public),
        ):
            if value is not None:
                changes[key] = value
        if env:
            changes["env"] = _parse_env(env)
        changes.update(_placement_options(node_selector, toleration))
    except (ArtifactError, ValueError) as exc:
        raise fail(str(exc)) from None
    new = _manage(common, lambda b: b.update_function(name, changes, archive))
    console.print(f"updated [bold]{name}[/bold] to revision {new.revision}, version {new.code_version}")


@fn_app.command("get")
def fn_get(name: str) -> None:
    """Print a function's spec as JSON."""
    common = settings()
    spec = _current(common, name)
    if spec is None:
        raise fail(f"no function named {name!r}")
    print_json(spec.model_dump(mode="json"))


@fn_app.command("list")
def fn_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List functions."""
    common = settings()
    specs = _manage(common, lambda b: b.functions())
    if as_json:
        print_json([s.model_dump(mode="json") for s in sorted(specs.values(), key=lambda s: s.name)])
        return
    table = Table("name", "version", "revision", "entrypoint", "timeout", "memory", "concurrency")
    for s in sorted(specs.values(), key=lambda s: s.name):
        table.add_row(
            s.name,
            s.code_version,
            str(s.revision),
            s.entrypoint,
            f"{s.timeout_s:g}s",
            f"{s.memory_mb}MB",
            str(s.concurrency),
        )
    console.print(table)


@fn_app.command("delete")
def fn_delete(name: str) -> None:
    """Delete a function (a tombstone on the function topic)."""
    common = settings()
    _manage(common, lambda b: b.delete_function(name))
    console.print(f"deleted [bold]{name}[/bold]")


@fn_app.command("invoke")
def fn_invoke(
    name: str,
    data: Annotated[str, typer.Option("--data", "-d", help="JSON payload.")] = "null",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the result.")] = 60.0,
) -> None:
    """Invoke a function; prints the result JSON, exits non-zero unless it is ok."""
    common = settings()
    try:
        payload = loads(data)
    except DecodeError as exc:
        raise fail(f"--data is not JSON: {exc.reason}") from None
    from services.common.telemetry import setup_tracing

    provider = setup_tracing("cli", common)

    try:
        result = _manage(common, lambda b: b.invoke(name, payload, timeout))
    except TimeoutError:
        raise fail(f"no result within {timeout:g}s") from None
    finally:
        provider.shutdown()
    print_json(result)
    raise typer.Exit(0 if result["status"] == "ok" else 1)


@fn_app.command("prewarm")
def fn_prewarm(
    name: str,
    count: Annotated[int, typer.Option(help="Instances that should hold the active version.", min=1, max=64)] = 1,
) -> None:
    """Load the function's active version into at least COUNT instances ahead of demand."""
    common = settings()
    _manage(common, lambda b: b.prewarm(name, count))
    console.print(f"asked for {count} prewarmed instance(s) of [bold]{name}[/bold]")


def _builds(common: CommonSettings, name: str) -> list[dict[str, Any]]:
    return _manage(common, lambda b: b.builds(name))


@fn_app.command("builds")
def fn_builds(name: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List a function's builds with status and timing."""
    common = settings()
    builds = _builds(common, name)
    if as_json:
        print_json(builds)
        return
    table = Table("build", "started", "commit", "status", "took", "reason", title=f"builds of {name}")
    for b in builds:
        started = time.strftime("%H:%M:%S", time.localtime(b.get("started", 0) / 1000)) if b.get("started") else "-"
        took = f"{b['duration_ms']:.0f} ms" if b.get("duration_ms") is not None else "-"
        table.add_row(
            b["build"], started, (b.get("commit") or "-")[:12], b.get("status", "?"), took, b.get("reason") or ""
        )
    console.print(table)


@fn_app.command("logs")
def fn_logs(
    name: str,
    build: Annotated[Optional[str], typer.Option("--build", help="A build's log (see `fn builds`).")] = None,
    last: Annotated[int, typer.Option(help="Invocations to show.")] = 20,
) -> None:
    """What the function printed in its last invocations (or, with --build, a build's log)."""
    common = settings()
    if build is None:
        results = _manage(common, lambda b: b.recent_results(name, last))
        for result in results:
            when = time.strftime("%H:%M:%S", time.localtime(result["completed_ms"] / 1000))
            console.print(
                f"[dim]{when}[/dim] [cyan]{result['id']}[/cyan] {result['status']} "
                f"[dim]{result.get('node') or ''} {result.get('instance') or ''}[/dim]",
                highlight=False,
            )
            logs = result.get("logs")
            if logs:
                sys.stdout.write(logs if logs.endswith("\n") else logs + "\n")
        if not results:
            console.print(f"no invocations of {name!r} on record")
        return
    found = build
    log = _manage(common, lambda b: b.build_log(name, found))
    sys.stdout.write(log.decode(errors="replace"))


wf_app = typer.Typer(help="Workflows: compose functions into one invocable unit.", no_args_is_help=True)
app.add_typer(wf_app, name="wf")


@wf_app.command("create")
def wf_create(
    name: str,
    file: Annotated[Path, typer.Option("--file", "-f", help="The workflow's YAML.", exists=True, dir_okay=False)],
    update: Annotated[bool, typer.Option(help="Replace an existing workflow.")] = False,
) -> None:
    """Create (or with --update, replace) a workflow from YAML; every problem is reported with its line."""
    common = settings()
    text = file.read_text()
    try:
        _manage(common, lambda b: b.put_workflow(name, text, replace=update))
    except operations.WorkflowRefused as exc:
        for line, reason in exc.errors:
            err.print(f"{file}:{line}: {reason}" if line else f"{file}: {reason}", highlight=False)
        raise fail(str(exc)) from None
    console.print(f"{'updated' if update else 'created'} workflow [bold]{name}[/bold]")


def _workflows(common: CommonSettings) -> dict[str, Any]:
    return _manage(common, lambda b: b.workflows())


@wf_app.command("get")
def wf_get(name: str) -> None:
    """Print a workflow's YAML."""
    common = settings()
    spec = _workflows(common).get(name)
    if spec is None:
        raise fail(f"no workflow named {name!r}")
    sys.stdout.write(spec.source if spec.source.endswith("\n") else spec.source + "\n")


@wf_app.command("list")
def wf_list() -> None:
    """List workflows."""
    common = settings()
    table = Table("name", "steps", "functions", "revision")
    for name, spec in sorted(_workflows(common).items()):
        table.add_row(
            name, str(len(spec.steps)), ", ".join(sorted({s.function for s in spec.steps})), str(spec.revision)
        )
    console.print(table)


@wf_app.command("delete")
def wf_delete(name: str) -> None:
    """Delete a workflow."""
    common = settings()
    _manage(common, lambda b: b.delete_workflow(name))
    console.print(f"deleted workflow [bold]{name}[/bold]")


@wf_app.command("run")
def wf_run(
    name: str,
    data: Annotated[str, typer.Option("--data", "-d", help="JSON input.")] = "null",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the result.")] = 300.0,
) -> None:
    """Run a workflow and print its result (exit code non-zero unless ok)."""
    fn_invoke(name, data, timeout)


@wf_app.command("runs")
def wf_runs(name: str, last: Annotated[int, typer.Option(help="Runs to show.")] = 20) -> None:
    """A workflow's recent runs: status and duration."""
    common = settings()
    table = Table("run", "started", "status", "took", "failed step", title=f"runs of {name}")
    for run in _manage(common, lambda b: b.runs_of(name, last)):
        took = f"{run['took_ms']} ms" if run["took_ms"] is not None else "-"
        started = time.strftime("%H:%M:%S", time.localtime(run["started_ms"] / 1000))
        table.add_row(run["run"], started, run["status"], took, run["failed_step"] or "")
    console.print(table)


@wf_app.command("run-status")
def wf_run_status(run_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every step of one run: status, timing, start kind and output."""
    common = settings()
    status = _manage(common, lambda b: b.run_status(run_id))
    rows = status["steps"]
    if as_json:
        print_json(status)
        return
    console.print(
        f"run {run_id} of [bold]{status['workflow']}[/bold]: {status.get('status', 'running')}"
        + (f" in {status['took_ms']} ms" if "took_ms" in status else "")
    )
    table = Table("step", "item", "attempt", "status", "took", "start", "output / error")
    for r in rows:
        shown = r["error"]["kind"] if r["error"] else orjson.dumps(r["output"]).decode()[:60]
        table.add_row(
            r["step"],
            "" if r["item"] is None else str(r["item"]),
            str(r["attempt"]),
            r["status"],
            f"{r['took_ms']} ms" if r["took_ms"] is not None else "-",
            r["start"] or "-",
            shown,
        )
    console.print(table)


node_app = typer.Typer(help="Nodes of a running platform: add, label, taint, cordon, drain.", no_args_is_help=True)
app.add_typer(node_app, name="node")


def _node_command(name: str, **changes: Any) -> None:
    common = settings()
    _manage(common, lambda b: b.configure_node(name, **changes))


def _taint(text: str) -> Taint:
    """One ``key[=value]:Effect``, parsed as an agent parses ``STOKER_NODE_TAINTS``."""
    try:
        taints = parse_taints(text)
    except ValueError as exc:  # pydantic's errors are ValueErrors too
        raise fail(f"bad taint {text!r}: {exc}") from None
    if len(taints) != 1:
        raise fail(f"a taint is key[=value]:Effect, got {text!r}")
    return taints[0]


@node_app.command("add")
def node_add(
    name: str,
    role: Annotated[str, typer.Option(help="runtime or isolated.")] = "runtime",
    label: Annotated[Optional[list[str]], typer.Option(help="key=value")] = None,
    taint: Annotated[Optional[list[str]], typer.Option(help="key=value:Effect")] = None,
) -> None:
    """Start another node agent in the embedded platform."""
    common = settings()
    _require_broker(common)
    if platform.alive(platform.read_pid(common, f"agent-{name}")) or f"agent-{name}" in platform.supervised(common):
        raise fail(f"node {name!r} is already running")
    for text in taint or []:
        _taint(text)
    config = platform.PlatformConfig(common=common, embedded_broker=False)
    comp = config.agent(name, role, ",".join(label or []), ",".join(taint or []))
    asyncio.run(ensure_topics(common.bootstrap, [common.topics.work_spec(name)]))
    try:
        platform.start_component(config, comp)
        platform.wait_ready(common, [comp.name])
    except platform.PlatformError as exc:
        raise fail(str(exc)) from None
    console.print(f"node [bold]{name}[/bold] ({role}) is up")


@node_app.command("label")
def node_label(name: str, labels: Annotated[list[str], typer.Argument(help="key=value, or key- to remove")]) -> None:
    """Set or remove labels of a node."""
    changes: dict[str, str | None] = {}
    for text in labels:
        if text.endswith("-") and "=" not in text:
            changes[text[:-1]] = None
        else:
            key, sep, value = text.partition("=")
            if not sep or not key:
                raise fail(f"a label is key=value (or key- to remove), got {text!r}")
            changes[key] = value
    _node_command(name, labels=changes)
    console.print(f"labels of {name} changed")


@node_app.command("taint")
def node_taint(
    name: str, taints: Annotated[list[str], typer.Argument(help="key=value:Effect, or key- to remove")]
) -> None:
    """Add or remove taints of a node (NoExecute drains functions that do not tolerate it)."""
    add = [_taint(t) for t in taints if not t.endswith("-")]
    remove = [t[:-1] for t in taints if t.endswith("-")]
    _node_command(name, add_taints=add, remove_taints=remove)
    console.print(f"taints of {name} changed")


@node_app.command("cordon")
def node_cordon(name: str) -> None:
    """Take no new instances or invocations on a node."""
    _node_command(name, unschedulable=True)
    console.print(f"{name} cordoned")


@node_app.command("uncordon")
def node_uncordon(name: str) -> None:
    _node_command(name, unschedulable=False)
    console.print(f"{name} uncordoned")


@node_app.command("drain")
def node_drain(name: str) -> None:
    """Cordon a node and retire its instances (busy ones when their invocation ends)."""
    _node_command(name, drain=True)
    console.print(f"{name} draining")


@fn_app.command("isolate")
def fn_isolate(
    name: str,
    seconds: Annotated[float, typer.Option("--for", help="How long, in seconds.")] = 600.0,
    release: Annotated[bool, typer.Option(help="End an isolation now.")] = False,
) -> None:
    """Run a function only on isolation nodes for a while (or --release it)."""
    common = settings()
    if release:
        _manage(common, lambda b: b.release(name))
    else:
        _manage(common, lambda b: b.isolate(name, seconds))
    console.print(f"{name} released" if release else f"{name} isolated for {seconds:g}s")


repo_app = typer.Typer(help="Per-repository settings.", no_args_is_help=True)
app.add_typer(repo_app, name="repo")


@repo_app.command("secret")
def repo_secret(repo: str, secret: str) -> None:
    """Set the webhook secret of one repository (overrides STOKER_WEBHOOK_SECRET for it)."""
    common = settings()
    _require_broker(common)
    _publish(common, RepoConfigured(repo=repo, webhook_secret=secret), common.topics.repo, repo)
    console.print(f"webhook secret set for {repo}")


@app.command()
def push(
    repo: Annotated[str, typer.Option(help="Repository URL, as functions are bound to it.")],
    ref: Annotated[str, typer.Option(help="Pushed ref.")] = "refs/heads/main",
    after: Annotated[Optional[str], typer.Option(help="Pushed commit (default: the ref's head at build time).")] = None,
    before: Annotated[Optional[str], typer.Option(help="Previous commit.")] = None,
    paths: Annotated[Optional[list[str]], typer.Option("--path", help="Changed files (default: unknown).")] = None,
    url: Annotated[
        Optional[str], typer.Option(help="Gateway URL (default http://127.0.0.1:$STOKER_HTTP_PORT).")
    ] = None,
    secret: Annotated[Optional[str], typer.Option(help="Webhook secret (default $STOKER_WEBHOOK_SECRET).")] = None,
) -> None:
    """Tell Stoker about a push (the generic webhook: for post-receive hooks and scripts)."""
    import httpx

    from services.gateway.webhooks import sign

    key = secret or os.environ.get("STOKER_WEBHOOK_SECRET", "")
    if not key:
        raise fail("no secret: pass --secret or set STOKER_WEBHOOK_SECRET")
    body = orjson.dumps({"repo": repo, "ref": ref, "before": before, "after": after, "paths": paths})
    target = url or f"http://127.0.0.1:{os.environ.get('STOKER_HTTP_PORT') or 8080}"
    headers = {
        "content-type": "application/json",
        "x-stoker-signature-256": sign(key, body),
        "x-stoker-delivery": uuid.uuid4().hex,
    }
    try:
        answer = httpx.post(f"{target}/webhooks/git", content=body, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise fail(f"could not reach the gateway at {target}: {exc}") from None
    if answer.status_code >= 300:
        raise fail(f"the gateway answered {answer.status_code}: {answer.text}")
    console.print(f"push accepted: {answer.json()}")


# ----- observing ------------------------------------------------------------------------------------


@app.command(
    "bench",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench(ctx: typer.Context) -> None:
    """Benchmarks side by side with the floor: floor, warm, cold, throughput, trace, hops, report, all."""
    from loadtest.__main__ import main as bench_main

    raise typer.Exit(bench_main(list(ctx.args)))


@app.command("trace")
def trace_cmd(ident: Annotated[str, typer.Argument(help="Invocation id (or trace id).")]) -> None:
    """Print the span tree of one invocation's trace, with durations."""
    from services.cli.tracefile import build_tree, linked_traces, load_spans, trace_ids_for

    common = settings()
    spans = load_spans(common.traces_dir)
    ids = trace_ids_for(spans, ident)
    if not ids:
        raise fail(
            f"no spans for {ident!r} in {common.traces_dir}: spans are written within a second, and a process "
            f"records at most STOKER_TRACES_PER_S ({common.traces_per_s:g}) new traces a second"
        )
    for trace_id in ids:
        console.print(build_tree(spans, trace_id))
        for linked in linked_traces(spans, trace_id):
            console.print(f"[magenta]linked from {trace_id[:8]}…:[/magenta]")
            console.print(build_tree(spans, linked))


@app.command()
def monitor(
    topics: Annotated[Optional[list[str]], typer.Argument(help="Topics (default: every Stoker topic).")] = None,
    from_beginning: Annotated[bool, typer.Option(help="Start at the oldest record.")] = False,
    limit: Annotated[Optional[int], typer.Option(help="Stop after this many records.")] = None,
    duration: Annotated[Optional[float], typer.Option(help="Stop after this many seconds.")] = None,
    heartbeats: Annotated[bool, typer.Option(help="Show node heartbeats too.")] = False,
) -> None:
    """Tail Stoker topics as readable lines (short names like `result` get the prefix)."""
    from services.cli.monitor import run_tail

    common = settings()
    _require_broker(common)
    names = [t if t.startswith(common.topic_prefix) else common.topic_prefix + t for t in topics or []]
    try:
        run_tail(
            settings=common,
            topics=names,
            from_beginning=from_beginning,
            limit=limit,
            duration_s=duration,
            console=console,
            include_heartbeats=heartbeats,
        )
    except KeyboardInterrupt:
        pass


def main() -> None:
    app()


if __name__ == "__main__":
    main()
