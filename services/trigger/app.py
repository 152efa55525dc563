"""Composition root of the trigger service: its producer, its views, the topic triggers and cron.

Every copy runs the topic triggers as members of each trigger's consumer group (so copies split
a trigger's partitions) and keeps the views; one copy at a time (the lease) fires cron slots.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import start_http_server

from events import InvocationCompleted, codec
from events.dlq import DeadLettered
from events.triggers import TriggerFired, TriggerSpec, TriggerStatus, TriggerTopics
from services.common.admin import ensure_topics
from services.common.kafkasec import client_options as kafka_client_options
from services.common.leadership import FencedWriter, Leadership
from services.common.resultscan import results_since
from services.common.runner import configure_logging, mark_ready, serve
from services.common.telemetry import setup_tracing
from services.common.views import Reader
from services.trigger import handlers, metrics
from services.trigger.core import Triggers
from services.trigger.cron import CronScheduler
from services.trigger.results import REPLY_NAME, ResultBook, is_trigger_result
from services.trigger.settings import TriggerSettings

log = logging.getLogger("stoker.trigger")
COMPONENT = "trigger"


async def run(settings: TriggerSettings) -> None:
    common = settings.common
    configure_logging(common)
    topics = common.topics
    family = TriggerTopics(topics)
    provider = setup_tracing(COMPONENT, common)
    client_id = f"stoker-{settings.instance_name}"
    producer = AIOKafkaProducer(
        bootstrap_servers=common.bootstrap,
        **kafka_client_options(),
        client_id=client_id,
        acks="all",
        enable_idempotence=True,
        linger_ms=2,
        request_timeout_ms=15_000,
        max_request_size=2 * 1024 * 1024,
    )
    admin = AIOKafkaAdminClient(
        bootstrap_servers=common.bootstrap, **kafka_client_options(), client_id=client_id, request_timeout_ms=10_000
    )

    async def send(topic: str, value: bytes | None, key: bytes | None, headers: list[tuple[str, bytes]]) -> Any:
        return await producer.send(topic, value, key=key, headers=headers or None)

    async def topic_exists(topic: str) -> bool:
        try:
            return topic in set(await admin.list_topics())
        except Exception as exc:  # noqa: BLE001 - unreachable broker: it does not exist for now
            log.warning("cannot list topics: %r", exc)
            return False

    async def scan(prefix: str, since_ms: int) -> list[InvocationCompleted]:
        _ids, found = await results_since(common.bootstrap, topics.result, since_ms, lambda i: i.startswith(prefix))
        return found

    async def publish_status(name: str, status: TriggerStatus | None) -> None:
        key = f"{name}/{settings.instance_name}".encode()
        await producer.send(family.status, codec.encode(status) if status is not None else None, key=key)

    async def to_dlq(letter: DeadLettered) -> None:
        await producer.send_and_wait(topics.dlq, codec.encode(letter), key=letter.key.encode() if letter.key else None)

    reader = Reader(common.bootstrap, COMPONENT, dead_letters=to_dlq)
    firings = reader.table(family.firing, (TriggerFired,), traced=False)
    core: Triggers | None = None

    def specs() -> list[TriggerSpec]:
        return core.cron_specs() if core is not None else []

    scheduler = CronScheduler(settings, specs, firings)
    core = Triggers(
        settings,
        send=send,
        book=ResultBook(),
        scan_results=scan,
        topic_exists=topic_exists,
        publish_status=publish_status,
        scheduler=scheduler,
    )
    triggers = core
    reader.table(
        family.definitions,
        (TriggerSpec,),
        on_change=lambda n, s: handlers.on_trigger_spec(triggers, n, s),
        traced=False,
    )
    # Results come back on one reply topic that every copy reads: a copy that takes a partition
    # over still hears of invocations its predecessor sent. Reading the platform's result topic
    # instead would cost this service a fetch and a key test for every invocation of the platform.
    reader.tail(
        topics.reply(REPLY_NAME),
        (InvocationCompleted,),
        lambda r: handlers.on_result(triggers, r),
        accept_key=is_trigger_result,
        traced=False,
    )

    stopping = False
    facts: dict[str, object] = {"instance": settings.instance_name, "role": "standby"}

    def on_role(role: str) -> None:
        if not stopping:
            facts["role"] = role
            mark_ready(common, settings.instance_name, **facts)

    leadership = Leadership.for_service(
        common.bootstrap,
        topics,
        "trigger-cron",
        instance=settings.instance_name,
        session_timeout_ms=settings.lease_timeout_ms,
        on_role=on_role,
    )

    async def lead(writer: FencedWriter) -> None:
        await scheduler.lead(writer)

    async def start() -> None:
        await ensure_topics(common.bootstrap, [*family.specs(), topics.reply_spec(REPLY_NAME)])
        if settings.metrics_port >= 0:
            server, _thread = start_http_server(
                settings.metrics_port, addr=settings.metrics_host, registry=metrics.REGISTRY
            )
            facts["metrics_port"] = server.server_port
        await producer.start()
        await admin.start()
        # The results tail fixes its start before any trigger sends an invocation: none is missed.
        await reader.start()
        await leadership.start()

    async def lead_while_holding() -> None:
        await leadership.run(lead)

    async def stop() -> None:
        nonlocal stopping
        stopping = True
        await leadership.stop()
        await triggers.stop()
        await reader.stop()
        await producer.stop()
        await admin.close()

    await serve(
        settings.instance_name,  # its pid and ready files: a pod's readiness probe looks for its own name
        common,
        None,
        on_start=[start],
        background=[triggers.apply_changes, triggers.status_loop, lead_while_holding],
        on_stop=[stop],
        ready_facts=facts,  # the same dict: the metrics port found at start is in the ready file
        stop_event=asyncio.Event(),
    )
    provider.shutdown()
