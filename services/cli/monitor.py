"""``stoker monitor``: tail Stoker topics as readable lines."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer
from rich.console import Console
from rich.markup import escape

from events import codec
from services.common.kafkasec import client_options as kafka_client_options
from services.common.settings import CommonSettings

SUMMARY_FIELDS = (
    "function",
    "action",
    "status",
    "start",
    "node",
    "state",
    "instance",
    "rule",
    "reason",
    "incarnation",
    "id",
    "principal",
    "method",
    "path",
)


def summarize(value: bytes | None) -> str:
    """One readable line for a record value."""
    if not value:
        return "(tombstone)"
    try:
        obj = codec.loads(value)
    except codec.DecodeError:
        return f"(not JSON) {value[:120]!r}"
    if not isinstance(obj, dict):
        return repr(obj)[:200]
    parts = [str(obj.get("type", "?"))]
    for key in SUMMARY_FIELDS:
        if obj.get(key) not in (None, "", []):
            parts.append(f"{key}={obj[key]}")
    if obj.get("type") == "invocation.completed":
        timings = obj.get("timings_ms")
        parts.append(f"total={timings.get('total') if isinstance(timings, dict) else '?'}ms")
    if obj.get("type") == "node.heartbeat":
        states: dict[str, int] = {}
        instances = obj.get("instances")
        for inst in instances if isinstance(instances, list) else []:
            if isinstance(inst, dict):
                states[str(inst.get("state"))] = states.get(str(inst.get("state")), 0) + 1
        parts.append("instances=" + (",".join(f"{k}:{v}" for k, v in sorted(states.items())) or "0"))
    if obj.get("type") == "record.dead-lettered":
        parts.append(f"from={obj.get('source_topic')}[{obj.get('partition')}]@{obj.get('offset')}")
    return " ".join(parts)


async def tail(
    settings: CommonSettings,
    topics: list[str],
    *,
    from_beginning: bool,
    limit: int | None,
    duration_s: float | None,
    console: Console,
    include_heartbeats: bool,
) -> int:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap,
        **kafka_client_options(),
        enable_auto_commit=False,
        auto_offset_reset="earliest" if from_beginning else "latest",
    )
    await consumer.start()
    try:
        if topics:
            consumer.subscribe(topics)
        else:
            consumer.subscribe(pattern=f"^{settings.topic_prefix.replace('.', '[.]')}.*")
        seen = 0
        stop_at = time.monotonic() + duration_s if duration_s else None
        while limit is None or seen < limit:
            if stop_at and time.monotonic() > stop_at:
                break
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for rec in records:
                    line = summarize(rec.value)
                    if not include_heartbeats and line.startswith("node.heartbeat") and not topics:
                        continue
                    ts = datetime.fromtimestamp(rec.timestamp / 1000).strftime("%H:%M:%S.%f")[:-3]
                    key = rec.key.decode(errors="replace") if rec.key else "-"
                    console.print(
                        f"[dim]{ts}[/dim] [cyan]{rec.topic}[/cyan] [yellow]{escape(key)}[/yellow] {escape(line)}",
                        highlight=False,
                        markup=True,
                        soft_wrap=True,
                    )
                    seen += 1
                    if limit is not None and seen >= limit:
                        return seen
        return seen
    finally:
        await consumer.stop()


def run_tail(**kwargs: Any) -> int:
    return asyncio.run(tail(**kwargs))
