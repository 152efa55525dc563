"""``stoker trigger …``: run a function on the records of any topic, or on a cron schedule."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Optional

import orjson
import typer
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from events import FunctionSpec, now_ms
from events.codec import DecodeError, loads
from events.topics import TopicSpec
from events.triggers import TriggerSpec, TriggerStatus, TriggerTopics
from events.workflow import WorkflowSpec
from services.common.admin import ensure_topics
from services.common.client import StokerClient
from services.common.kafkasec import client_options as kafka_client_options
from services.common.settings import CommonSettings
from services.trigger import schedule

app = typer.Typer(
    help="Triggers: a function per record of a topic, or per slot of a cron schedule.", no_args_is_help=True
)
console = Console()
err = Console(stderr=True)

STALE_S = 10.0
"""A copy's status older than this is shown as stale (the copy may be gone)."""


def _settings() -> CommonSettings:
    from services.cli.main import settings

    return settings()


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(1)


async def _specs(client: StokerClient) -> dict[str, TriggerSpec]:
    rows: dict[str, Any] = await client.table(TriggerTopics(client.topics).definitions, TriggerSpec)
    return rows


async def _statuses(client: StokerClient) -> dict[str, list[TriggerStatus]]:
    rows = await client.table(TriggerTopics(client.topics).status, TriggerStatus)
    out: dict[str, list[TriggerStatus]] = {}
    for row in rows.values():
        assert isinstance(row, TriggerStatus)
        out.setdefault(row.trigger, []).append(row)
    return out


async def _existing_topics(bootstrap: str) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **kafka_client_options(), request_timeout_ms=10_000)
    await admin.start()
    try:
        names = list(await admin.list_topics())
        described = await admin.describe_topics(names) if names else []
        return {d["topic"]: len(d.get("partitions", [])) for d in described if not d.get("error_code")}
    finally:
        await admin.close()


async def group_lag(bootstrap: str, group: str, topic: str) -> dict[str, int] | None:
    """Per partition of ``topic``: end offset - the group's committed offset (None: nothing committed)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **kafka_client_options(), request_timeout_ms=10_000)
    await admin.start()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, **kafka_client_options(), enable_auto_commit=False)
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        mine = {tp: om.offset for tp, om in committed.items() if tp.topic == topic and om.offset >= 0}
        if not mine:
            return None
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)] or list(mine)
        ends = await consumer.end_offsets(tps)
        return {str(tp.partition): max(0, ends[tp] - mine.get(tp, 0)) for tp in tps}
    finally:
        await consumer.stop()
        await admin.close()


def _row(spec: TriggerSpec, statuses: list[TriggerStatus], live_lag: dict[str, int] | None) -> dict[str, Any]:
    """What ``get``, ``list`` and ``stoker status`` show of one trigger."""
    now = now_ms()
    fresh = [s for s in statuses if now - s.at_ms <= STALE_S * 1000]
    states: list[str] = sorted({s.state for s in fresh}) or (["paused"] if spec.paused else ["no service"])
    row: dict[str, Any] = {
        "name": spec.name,
        "kind": spec.kind,
        "function": spec.function,
        "source": spec.topic if spec.kind == "topic" else f"cron {spec.cron!r} {spec.timezone}",
        "paused": spec.paused,
        "state": "paused" if spec.paused else ",".join(states),
        "reason": "; ".join(sorted({s.reason for s in fresh if s.reason})),
        "copies": {
            s.instance: s.model_dump(mode="json", exclude={"type", "version", "trigger", "instance"}) for s in statuses
        },
    }
    if spec.kind == "topic":
        row["lag"] = sum(live_lag.values()) if live_lag is not None else None
        row["lag_by_partition"] = live_lag
        row["delivered"] = sum(s.delivered for s in fresh)
        row["failed"] = sum(s.failed for s in fresh)
        row["retried"] = sum(s.retried for s in fresh)
        row["in_flight"] = sum(s.in_flight for s in fresh)
    else:
        lasts = [s.last_fired_ms for s in statuses if s.last_fired_ms]
        nexts = [s.next_fire_ms for s in fresh if s.next_fire_ms and s.state == "running"]
        row["last_fired_ms"] = max(lasts) if lasts else None
        row["next_fire_ms"] = min(nexts) if nexts else None
    return row


async def trigger_rows(common: CommonSettings, client: StokerClient, only: str | None = None) -> dict[str, Any]:
    """Every trigger (or ``only``) with its state and lag, as ``stoker trigger list --json`` gives them."""
    family = TriggerTopics(common.topics)
    existing = await _existing_topics(common.bootstrap)
    if family.definitions not in existing or family.status not in existing:
        return {}  # no trigger was ever made here (the service or the first create makes the topics)
    specs, statuses = await asyncio.gather(_specs(client), _statuses(client))
    out: dict[str, Any] = {}
    for name, spec in sorted(specs.items()):
        if only is not None and name != only:
            continue
        live = None
        if spec.kind == "topic" and spec.topic:
            try:
                live = await group_lag(common.bootstrap, spec.consumer_group, spec.topic)
            except Exception:  # noqa: BLE001 - the lag is a figure to show, not a reason to fail the command
                live = None
        out[name] = _row(spec, statuses.get(name, []), live)
    return out


def status_report(common: CommonSettings) -> dict[str, Any]:
    """The ``triggers`` section of ``stoker status``."""

    async def go() -> dict[str, Any]:
        async with StokerClient(common) as client:
            return await trigger_rows(common, client)

    return asyncio.run(go())


def status_section(common: CommonSettings) -> dict[str, Any]:
    """:func:`status_report` for ``stoker status``, which must not fail because of triggers."""
    try:
        return status_report(common)
    except Exception as exc:  # noqa: BLE001 - the rest of the status is still worth showing
        err.print(f"[yellow]triggers: {exc}[/yellow]")
        return {}


def print_rows(rows: dict[str, Any], title: str = "triggers") -> None:
    if not rows:
        return
    table = Table("trigger", "kind", "function", "source", "state", "lag", "delivered / failed", "next", title=title)
    for name, row in rows.items():
        nxt = row.get("next_fire_ms")
        table.add_row(
            name,
            row["kind"],
            row["function"],
            row["source"],
            row["state"] + (f" ({row['reason']})" if row.get("reason") else ""),
            "-" if row.get("lag") is None else str(row["lag"]),
            f"{row['delivered']} / {row['failed']}" if row["kind"] == "topic" else "-",
            time.strftime("%H:%M:%S", time.localtime(nxt / 1000)) if nxt else "-",
        )
    console.print(table)


def _write(common: CommonSettings, spec: TriggerSpec) -> None:
    async def go() -> None:
        async with StokerClient(common) as client:
            await ensure_topics(common.bootstrap, TriggerTopics(common.topics).specs())
            await client.send(spec, TriggerTopics(common.topics).definitions, spec.name)

    asyncio.run(go())


def _get(common: CommonSettings, name: str) -> TriggerSpec:
    async def go() -> dict[str, TriggerSpec]:
        if TriggerTopics(common.topics).definitions not in await _existing_topics(common.bootstrap):
            return {}
        async with StokerClient(common) as client:
            return await _specs(client)

    spec = asyncio.run(go()).get(name)
    if spec is None:
        raise _fail(f"no trigger named {name!r}")
    return spec


@app.command("create")
def create(
    name: str,
    function: Annotated[str, typer.Option("--function", "-f", help="The function (or workflow) to invoke.")],
    topic: Annotated[Optional[str], typer.Option(help="Source topic: one invocation per record.")] = None,
    cron: Annotated[Optional[str], typer.Option(help='Cron schedule ("*/5 * * * *"): one invocation per slot.')] = None,
    group: Annotated[Optional[str], typer.Option(help="Consumer group (default stoker-trigger-NAME).")] = None,
    response_topic: Annotated[Optional[str], typer.Option(help="The function's output goes here.")] = None,
    error_topic: Annotated[Optional[str], typer.Option(help="Failed records go here (trigger.failed).")] = None,
    max_retries: Annotated[int, typer.Option(help="Retries of a failing record.")] = 3,
    backoff_s: Annotated[float, typer.Option(help="Wait before the first retry (doubling).")] = 1.0,
    concurrency: Annotated[int, typer.Option(help="Records running at once, per service copy.")] = 8,
    ordered: Annotated[str, typer.Option(help="per-key: one record of a key at a time; none.")] = "none",
    start_from: Annotated[str, typer.Option("--from", help="Where a new group starts: earliest or latest.")] = "latest",
    payload: Annotated[Optional[str], typer.Option(help="JSON passed with each cron firing.")] = None,
    timezone: Annotated[str, typer.Option(help="IANA time zone of the cron schedule.")] = "UTC",
    catch_up: Annotated[str, typer.Option(help="After an outage: once (the latest missed slot) or none.")] = "once",
) -> None:
    """Create a trigger. A topic trigger on a topic that does not exist is refused."""
    common = _settings()
    if (topic is None) == (cron is None):
        raise _fail("give exactly one of --topic or --cron")
    data: Any = None
    if payload is not None:
        try:
            data = loads(payload)
        except DecodeError as exc:
            raise _fail(f"--payload: {exc.reason}") from None
    if cron is not None:
        try:
            schedule.validate(cron, timezone)
        except schedule.ScheduleError as exc:
            raise _fail(str(exc)) from None
    try:
        spec = TriggerSpec(
            name=name,
            function=function,
            kind="topic" if topic else "cron",
            topic=topic,
            group=group,
            response_topic=response_topic,
            error_topic=error_topic,
            max_retries=max_retries,
            backoff_s=backoff_s,
            concurrency=concurrency,
            ordered=ordered,  # type: ignore[arg-type]
            start=start_from,  # type: ignore[arg-type]
            cron=cron,
            payload=data,
            timezone=timezone,
            catch_up=catch_up,  # type: ignore[arg-type]
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise _fail(problems) from None

    async def check() -> str | None:
        await ensure_topics(common.bootstrap, TriggerTopics(common.topics).specs())
        async with StokerClient(common) as client:
            specs = await _specs(client)
            if name in specs:
                return f"trigger {name!r} exists (delete it first)"
            functions: dict[str, FunctionSpec] = await client.functions()
            workflows = await client.table(common.topics.workflow, WorkflowSpec)
            if function not in functions and function not in workflows:
                return f"no function or workflow named {function!r}"
            if topic is not None:
                existing = await _existing_topics(common.bootstrap)
                if topic not in existing:
                    return f"topic {topic!r} does not exist: create it first (a trigger is refused, not left waiting)"
                outputs = [t for t in (response_topic, error_topic) if t and t not in existing]
                if outputs:
                    await ensure_topics(common.bootstrap, [TopicSpec(t, partitions=existing[topic]) for t in outputs])
            return None

    problem = asyncio.run(check())
    if problem:
        raise _fail(problem)
    _write(common, spec)
    console.print(f"trigger {name} created ({spec.kind}: {spec.topic or spec.cron} -> {function})")


@app.command("list")
def list_(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every trigger, its state and its lag."""
    rows = status_report(_settings())
    if as_json:
        print(orjson.dumps(list(rows.values()), option=orjson.OPT_INDENT_2).decode())
        return
    if not rows:
        console.print("no triggers")
    print_rows(rows)


@app.command("get")
def get(name: str) -> None:
    """A trigger's definition, its state on each service copy, and its lag (JSON)."""
    common = _settings()
    spec = _get(common, name)

    async def go() -> dict[str, Any]:
        async with StokerClient(common) as client:
            return await trigger_rows(common, client, only=name)

    row = asyncio.run(go()).get(name, {})
    out = {**spec.model_dump(mode="json", exclude={"type", "version"}), "status": row}
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())


@app.command("delete")
def delete(name: str) -> None:
    """Delete a trigger (a topic trigger's consumer group keeps its offsets)."""
    common = _settings()
    _get(common, name)
    family = TriggerTopics(common.topics)

    async def go() -> None:
        async with StokerClient(common) as client:
            await client.tombstone(family.definitions, name)
            await client.tombstone(family.firing, name)
            statuses = await _statuses(client)
            for status in statuses.get(name, []):
                await client.tombstone(family.status, f"{name}/{status.instance}")

    asyncio.run(go())
    console.print(f"trigger {name} deleted")


def _set_paused(name: str, paused: bool) -> None:
    common = _settings()
    spec = _get(common, name)
    if spec.paused == paused:
        console.print(f"trigger {name} is already {'paused' if paused else 'running'}")
        return
    changes: dict[str, Any] = {"paused": paused, "revision": spec.revision + 1, "updated_ms": now_ms()}
    if not paused:
        changes["active_since_ms"] = now_ms()  # slots of the pause are not caught up
    _write(common, spec.model_copy(update=changes))
    console.print(f"trigger {name} {'paused' if paused else 'resumed'}")


@app.command("pause")
def pause(name: str) -> None:
    """Stop consuming (offsets are kept) or firing."""
    _set_paused(name, True)


@app.command("resume")
def resume(name: str) -> None:
    """Consume again from the committed offsets; a cron trigger fires from now on."""
    _set_paused(name, False)
