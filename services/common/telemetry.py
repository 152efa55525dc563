"""Tracing, set up once per process and applied to the broker as middleware.

With ``STOKER_OTLP_ENDPOINT`` spans go to an OTLP/HTTP collector; without one they go to
``<home>/traces/<service>-<pid>.jsonl`` (one JSON object per span), which ``stoker trace``
reads back. Span names and attributes of Kafka hops come from faststream's OpenTelemetry
middleware, which follows the messaging semantic conventions and carries ``traceparent``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, TraceState
from opentelemetry.util.types import Attributes

from services.common.settings import CommonSettings

INVOCATION_ID = "stoker.invocation.id"
PRINCIPAL = "stoker.principal"
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


class TokenBucket:
    """At most ``per_s`` grants a second, in bursts of at most ``per_s``; ``clock`` is injectable for tests."""

    def __init__(self, per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_s = per_s
        self.capacity = max(1.0, per_s)
        self._clock = clock
        self._tokens = self.capacity
        self._at = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        if self.per_s <= 0:
            return False
        with self._lock:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.per_s)
            self._at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


class RateLimitedSampler(Sampler):
    """Records new traces up to a rate, as Jaeger's rate-limiting sampler does.

    Only the root of a trace asks (under ``ParentBased`` a span follows its parent's decision, carried
    in ``traceparent``), so a trace is recorded whole in every service or not at all. Under load the
    unrecorded spans cost a few microseconds each instead of an export apiece in every service.
    """

    def __init__(self, per_s: float) -> None:
        self._bucket = TokenBucket(per_s)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if self._bucket.take():
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, trace_state)
        return SamplingResult(Decision.DROP, None, trace_state)

    def get_description(self) -> str:
        return f"RateLimitedSampler{{{self._bucket.per_s:g}/s}}"


_UNRECORDED = trace.NonRecordingSpan(trace.SpanContext(trace_id=0x5700_4E52 << 96 | 1, span_id=1, is_remote=False))
"""A valid parent that is not sampled: under ``ParentBased`` every span started below it is dropped."""


@contextmanager
def untraced() -> Iterator[None]:
    """Spans started inside (a publish's, by faststream's middleware) are not recorded.

    For a periodic record such as a node's heartbeat: nobody's trace, and otherwise a new trace each time.
    """
    token = otel_context.attach(trace.set_span_in_context(_UNRECORDED))
    try:
        yield
    finally:
        otel_context.detach(token)


def setup_tracing(service: str, settings: CommonSettings) -> TracerProvider:
    """Create this process's tracer provider and make it the global one."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"stoker-{service}"}),
        sampler=ParentBased(root=RateLimitedSampler(settings.traces_per_s)),
    )
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
