"""Rate-limited trace sampling: the root decides, every later hop follows through ``traceparent``."""

from __future__ import annotations

from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased

from services.common.telemetry import RateLimitedSampler, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_grants_a_burst_then_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(10, clock)
    assert sum(bucket.take() for _ in range(25)) == 10  # a burst of per_s
    clock.now = 0.5
    assert sum(bucket.take() for _ in range(25)) == 5  # then per_s a second
    clock.now = 100.0
    assert sum(bucket.take() for _ in range(25)) == 10  # never more than a burst saved up


def test_a_rate_of_zero_records_nothing_and_a_fraction_still_records_one() -> None:
    assert not TokenBucket(0).take()
    clock = Clock()
    slow = TokenBucket(0.5, clock)
    assert slow.take() and not slow.take()
    clock.now = 2.0
    assert slow.take()


def provider(per_s: float) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    p = TracerProvider(sampler=ParentBased(root=RateLimitedSampler(per_s)))
    p.add_span_processor(SimpleSpanProcessor(exporter))
    return p, exporter


def test_a_trace_is_recorded_whole_in_every_service_or_not_at_all() -> None:
    gateway, gateway_spans = provider(2)
    agent, agent_spans = provider(0)  # a downstream service never starts traces of its own here
    for i in range(5):
        headers: dict[str, str] = {}
        with gateway.get_tracer("t").start_as_current_span(f"root {i}"):
            inject(headers)
        with agent.get_tracer("t").start_as_current_span(f"child {i}", context=extract(headers)):
            pass
    roots = sorted(s.name for s in gateway_spans.get_finished_spans())
    children = sorted(s.name for s in agent_spans.get_finished_spans())
    assert roots == ["root 0", "root 1"]
    assert children == ["child 0", "child 1"]  # the downstream hop followed the root's decision
    recorded = {s.context.trace_id for s in gateway_spans.get_finished_spans()}
    assert {s.context.trace_id for s in agent_spans.get_finished_spans()} == recorded


def test_spans_under_untraced_are_not_recorded_however_many_tokens_are_left() -> None:
    from opentelemetry import trace

    from services.common.telemetry import untraced

    p, spans = provider(1000)
    tracer = p.get_tracer("t")
    with untraced():
        with tracer.start_as_current_span("heartbeat publish") as span:
            assert not span.is_recording()
    with tracer.start_as_current_span("an invocation"):
        assert trace.get_current_span().is_recording()
    assert [s.name for s in spans.get_finished_spans()] == ["an invocation"]
