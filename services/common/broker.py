"""The broker factory: one KafkaBroker per service, with Stoker's codec, dead-lettering and tracing.

Producers are idempotent with ``acks=all``; consumers never auto-commit (each subscriber
states its ack policy); records that cannot be decoded, or that a handler rejects as poison,
are written to the dead-letter topic with their origin and reason, and the consumer goes on.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from aiokafka.errors import KafkaError
from faststream.kafka import KafkaBroker
from faststream.kafka.opentelemetry import KafkaTelemetryMiddleware
from faststream.middlewares import BaseMiddleware
from opentelemetry.sdk.trace import TracerProvider
from pydantic import BaseModel

from events import codec
from events.base import Record
from events.dlq import DeadLettered
from services.common.kafkasec import faststream_security
from services.common.settings import CommonSettings

log = logging.getLogger("stoker.broker")


class PoisonRecord(Exception):
    """Raised by a handler for a record that decoded but can never be processed."""


class StokerCodec:
    """faststream codec: Stoker records <-> orjson bytes. Tombstones decode to ``None``."""

    async def decode(self, msg: Any) -> Any:
        if not msg.body:
            return None
        return codec.decode(msg.body)

    async def encode(self, msg: Any, serializer: Any = None) -> tuple[bytes, str | None]:
        if msg is None:
            return b"", None
        if isinstance(msg, bytes):
            return msg, None
        if isinstance(msg, Record):
            return codec.encode(msg), "application/json"
        if isinstance(msg, BaseModel):
            return codec.encode_value(msg.model_dump(mode="json")), "application/json"
        return codec.encode_value(msg), "application/json"


def dead_letter_for(
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    reason: str,
    consumer: str,
) -> DeadLettered:
    """Build the dead letter for one record."""
    raw = value or b""
    try:
        text, b64 = raw.decode("utf-8"), None
    except UnicodeDecodeError:
        text, b64 = raw.decode("utf-8", errors="replace"), base64.b64encode(raw).decode()
    return DeadLettered(
        source_topic=topic,
        partition=partition,
        offset=offset,
        key=key.decode("utf-8", errors="replace") if key else None,
        reason=reason,
        value=text[:100_000],
        value_b64=b64,
        consumer=consumer,
    )


def dead_letter_of(rec: Any, reason: str, consumer: str) -> DeadLettered:
    """The dead letter of a consumed record (anything with aiokafka's ``topic``, ``partition``,
    ``offset``, ``key`` and ``value``)."""
    return dead_letter_for(
        topic=rec.topic,
        partition=rec.partition,
        offset=rec.offset,
        key=rec.key,
        value=rec.value,
        reason=reason,
        consumer=consumer,
    )


def make_dead_letter_middleware(dlq_topic: str, consumer: str, broker_ref: list[KafkaBroker]) -> type:
    """A middleware that moves undecodable or poison records to ``dlq_topic`` and acks them."""

    class DeadLetterMiddleware(BaseMiddleware):  # type: ignore[type-arg]
        async def consume_scope(self, call_next: Any, msg: Any) -> Any:
            try:
                return await call_next(msg)
            except KafkaError as exc:
                if exc.retriable:
                    raise  # transient broker trouble: let the ack policy redeliver it
                reason = f"kafka error: {exc!r}"
            except codec.DecodeError as exc:
                reason = exc.reason
            except PoisonRecord as exc:
                reason = str(exc)
            raw = msg.raw_message
            letter = dead_letter_of(raw, reason, consumer)
            log.warning("dead-lettering %s[%s]@%s: %s", raw.topic, raw.partition, raw.offset, reason)
            await broker_ref[0].publish(letter, dlq_topic, key=raw.key)
            return None

    return DeadLetterMiddleware


def make_broker(settings: CommonSettings, service: str, tracer_provider: TracerProvider | None = None) -> KafkaBroker:
    """Build a service's broker. Subscribers are added by the service's app module."""
    ref: list[KafkaBroker] = []
    middlewares: list[Any] = [make_dead_letter_middleware(settings.topics.dlq, service, ref)]
    if tracer_provider is not None:
        middlewares.insert(0, KafkaTelemetryMiddleware(tracer_provider=tracer_provider))
    broker = KafkaBroker(
        settings.bootstrap,
        client_id=f"stoker-{service}",
        security=faststream_security(settings.kafka),
        codec=StokerCodec(),
        middlewares=middlewares,
        acks="all",
        enable_idempotence=True,
        linger_ms=0,
        request_timeout_ms=15_000,
        log_level=logging.WARNING,
    )
    ref.append(broker)
    return broker
