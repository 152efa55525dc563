"""What a function receives for one source record, and what the error topic gets: pure.

A record's value is passed decoded when it is JSON (``value_encoding: "json"``), else as base64
text (``"base64"``), so any bytes reach the function unchanged. Keys and header values are text
when they are UTF-8, else base64 too (``key_encoding``; header values that are not UTF-8 are
listed in ``headers_base64``).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

TRACE_HEADERS = frozenset({"traceparent", "tracestate", "baggage"})
"""Trace context headers: carried over to the invocation, and still shown to the function."""


@dataclass(frozen=True)
class SourceRecord:
    """The parts of a consumed record a trigger uses (so the pure logic needs no Kafka types)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]] = ()
    timestamp_ms: int | None = None

    @property
    def coordinates(self) -> str:
        return f"{self.topic}-{self.partition}-{self.offset}"


def decode_value(raw: bytes | None) -> tuple[Any, str]:
    """(value, encoding): JSON decoded when the bytes are JSON, else base64 text."""
    if raw is None:
        return None, "json"
    try:
        return orjson.loads(raw), "json"
    except orjson.JSONDecodeError:
        return base64.b64encode(raw).decode(), "base64"


def _text(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode(), True


def event_of(rec: SourceRecord, trigger: str) -> dict[str, Any]:
    """The function's event for one record."""
    value, encoding = decode_value(rec.value)
    key: str | None = None
    key_encoding = "utf-8"
    if rec.key is not None:
        key, b64 = _text(rec.key)
        key_encoding = "base64" if b64 else "utf-8"
    headers: dict[str, str] = {}
    headers_b64: list[str] = []
    for name, raw in rec.headers:
        if raw is None:
            headers[name] = ""
            continue
        text, b64 = _text(raw)
        headers[name] = text
        if b64:
            headers_b64.append(name)
    event: dict[str, Any] = {
        "value": value,
        "value_encoding": encoding,
        "key": key,
        "key_encoding": key_encoding,
        "headers": headers,
        "topic": rec.topic,
        "partition": rec.partition,
        "offset": rec.offset,
        "timestamp": rec.timestamp_ms,
        "trigger": trigger,
    }
    if headers_b64:
        event["headers_base64"] = headers_b64
    return event


def trace_carrier(rec: SourceRecord) -> dict[str, str]:
    """The source record's W3C trace context, if it carries one."""
    return {
        name: raw.decode("latin-1") for name, raw in rec.headers if raw is not None and name.lower() in TRACE_HEADERS
    }
