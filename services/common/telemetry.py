"""Tracing, set up once per process and applied to the broker as middleware.

With ``STOKER_OTLP_ENDPOINT`` spans go to an OTLP/HTTP collector; without one they go to
``<home>/traces/<service>-<pid>.jsonl`` (one JSON object per span), which ``stoker trace``
reads back. Span names and attributes of Kafka hops come from faststream's OpenTelemetry
middleware, which follows the messaging semantic conventions and carries ``traceparent``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from services.common.settings import CommonSettings

INVOCATION_ID = "stoker.invocation.id"
FUNCTION = "stoker.function"
NODE = "stoker.node"
START_KIND = "stoker.start"


def span_to_dict(span: ReadableSpan, service: str) -> dict[str, Any]:
    """The JSON-lines form of one finished span."""
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "trace_id": format(ctx.trace_id, "032x") if ctx else None,
        "span_id": format(ctx.span_id, "016x") if ctx else None,
        "parent_id": format(parent.span_id, "016x") if parent else None,
        "name": span.name,
        "kind": span.kind.name if span.kind else None,
        "service": service,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "links": [
            {"trace_id": format(link.context.trace_id, "032x"), "span_id": format(link.context.span_id, "016x")}
            for link in span.links
        ],
    }


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans to a local file, one JSON object per line."""

    def __init__(self, path: Path, service: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("ab")
        self._service = service
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = b"".join(orjson.dumps(span_to_dict(s, self._service), default=str) + b"\n" for s in spans)
        with self._lock:
            self._file.write(lines)
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


def setup_tracing(service: str, settings: CommonSettings) -> TracerProvider:
    """Create this process's tracer provider and make it the global one."""
    provider = TracerProvider(resource=Resource.create({"service.name": f"stoker-{service}"}))
    exporter: SpanExporter
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint)
    else:
        exporter = JsonLinesSpanExporter(settings.traces_dir / f"{service}-{os.getpid()}.jsonl", service)
    # Export off the hot path: a background thread batches spans once a second (sooner when a
    # batch fills). It wakes on that timer even with nothing to export, so not more often.
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    trace.set_tracer_provider(provider)
    return provider
