"""The Reader's pure parts: where partitions go after views change, what each view is handed,
dead letters and trace spans (no broker: records are handed over as the follower would)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from events import FunctionSpec, InvocationCompleted
from events.codec import encode
from events.dlq import DeadLettered
from events.function import CodeSource
from services.common.views import Reader, seeks_after, trace_context

A0, A1, B0 = TopicPartition("a", 0), TopicPartition("a", 1), TopicPartition("b", 0)


def rec(
    topic: str, offset: int, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]] = ()
) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic=topic,
        partition=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=len(key or b""),
        serialized_value_size=len(value or b""),
        headers=headers,
    )


def spec(name: str) -> bytes:
    return encode(FunctionSpec(name=name, entrypoint="h:main", source=CodeSource(kind="archive", digest="d", uri="u")))


def attach(reader: Reader, *views: Any) -> None:
    """What the follower does on attach, without a consumer: partitions, start offsets, the index."""
    for view in views:
        tp = TopicPartition(view.topic, 0)
        view._tps, view._next, view._state = [tp], {tp: 0}, "attached"
        reader._by_tp.setdefault(tp, []).append(view)


# ----- seeks_after ------------------------------------------------------------------------------


def test_a_new_partition_starts_where_its_view_starts_and_the_others_keep_their_positions() -> None:
    # assign() forgets every position, so each one is put back.
    assert seeks_after({A0}, {A0, B0}, {A0: 40}, {B0: 7}) == {A0: 40, B0: 7}


def test_a_view_starting_below_the_shared_position_moves_it_back() -> None:
    assert seeks_after({A0, A1}, {A0, A1}, {A0: 40, A1: 3}, {A0: 0, A1: 5}) == {A0: 0}


def test_a_view_starting_above_the_shared_position_leaves_it() -> None:
    assert seeks_after({A0}, {A0}, {A0: 40}, {A0: 90}) == {}


def test_detaching_a_topic_puts_the_rest_back() -> None:
    assert seeks_after({A0, B0}, {A0}, {A0: 12, B0: 3}, {}) == {A0: 12}


def test_a_position_being_reset_is_left_to_the_consumer() -> None:
    assert seeks_after({A0}, {A0, B0}, {A0: None}, {B0: 0}) == {B0: 0}


# ----- handing records to views -----------------------------------------------------------------


def test_a_table_keeps_the_latest_per_key_and_tombstones_remove() -> None:
    reader = Reader("unused:9092", "test")
    changes: list[tuple[str, str | None]] = []
    table = reader.table("a", (FunctionSpec,), on_change=lambda k, r: changes.append((k, r.name if r else None)))
    attach(reader, table)
    reader._hand_over({A0: [rec("a", 0, b"x", spec("x")), rec("a", 1, b"y", spec("y")), rec("a", 2, b"x", None)]})
    assert set(table.rows) == {"y"}
    assert changes == [("x", "x"), ("y", "y"), ("x", None)]
    assert table._next[A0] == 3


def test_each_view_is_handed_a_record_once_even_after_a_rewind() -> None:
    reader = Reader("unused:9092", "test")
    first: list[str] = []
    second: list[str] = []
    old = reader.table("a", (FunctionSpec,), on_change=lambda k, _r: first.append(k))
    new = reader.table("a", (FunctionSpec,), on_change=lambda k, _r: second.append(k))
    attach(reader, old, new)
    old._next[A0] = 2  # the old table had read offsets 0 and 1 before the new one moved the partition back
    reader._hand_over({A0: [rec("a", 0, b"p", spec("p")), rec("a", 1, b"q", spec("q")), rec("a", 2, b"r", spec("r"))]})
    assert first == ["r"] and second == ["p", "q", "r"]


def test_a_tail_skips_other_keys_and_tombstones() -> None:
    reader = Reader("unused:9092", "test")
    seen: list[str] = []
    tail = reader.tail("a", (InvocationCompleted,), lambda r: seen.append(r.id), key="k")
    attach(reader, tail)
    done = encode(InvocationCompleted(id="i1", function="f", status="ok"))
    reader._hand_over({A0: [rec("a", 0, b"other", done), rec("a", 1, b"k", None), rec("a", 2, b"k", done)]})
    assert seen == ["i1"] and tail._next[A0] == 3


def test_bad_records_are_dead_lettered_with_the_service_name_and_reading_goes_on() -> None:
    async def scenario() -> list[DeadLettered]:
        letters: list[DeadLettered] = []

        async def sink(letter: DeadLettered) -> None:
            letters.append(letter)

        reader = Reader("unused:9092", "gateway", dead_letters=sink)
        table = reader.table("a", (FunctionSpec,))
        attach(reader, table)
        reader._hand_over(
            {
                A0: [
                    rec("a", 0, b"x", b"\xff not json"),
                    rec("a", 1, None, spec("nokey")),
                    rec("a", 2, b"y", encode(InvocationCompleted(id="i", function="f", status="ok"))),
                    rec("a", 3, b"z", spec("z")),
                ]
            }
        )
        await asyncio.gather(*reader._background)
        assert set(table.rows) == {"z"}
        return letters

    letters = asyncio.run(scenario())
    assert [(d.offset, d.consumer) for d in letters] == [(0, "gateway"), (1, "gateway"), (2, "gateway")]
    assert letters[0].value_b64 is not None  # not UTF-8: the exact bytes are kept
    assert "without a key" in letters[1].reason and "does not belong here" in letters[2].reason


def test_a_failing_callback_does_not_stop_the_others() -> None:
    reader = Reader("unused:9092", "test")
    seen: list[str] = []

    def boom(key: str, _r: object) -> None:
        if key == "x":
            raise ValueError("no")
        seen.append(key)

    table = reader.table("a", (FunctionSpec,), on_change=boom)
    attach(reader, table)
    reader._hand_over({A0: [rec("a", 0, b"x", spec("x")), rec("a", 1, b"y", spec("y"))]})
    assert seen == ["y"] and set(table.rows) == {"x", "y"}


def test_async_callbacks_run_in_order_without_holding_the_reader() -> None:
    async def scenario() -> None:
        reader = Reader("unused:9092", "test")
        seen: list[str] = []

        async def slow(key: str, _record: object) -> None:
            await asyncio.sleep(0.02 if key == "x" else 0)
            seen.append(key)

        table = reader.table("a", (FunctionSpec,), on_change=slow)
        attach(reader, table)
        table._begin()
        reader._hand_over({A0: [rec("a", 0, b"x", spec("x")), rec("a", 1, b"y", spec("y"))]})
        assert set(table.rows) == {"x", "y"} and seen == []  # the rows at once, the callbacks on their task
        await table._drained()
        assert seen == ["x", "y"]
        await table._end()

    asyncio.run(scenario())


# ----- tracing ----------------------------------------------------------------------------------


def memory_spans() -> InMemorySpanExporter:
    """An in-memory exporter on the global provider (set here unless a test set one already)."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def test_records_with_trace_context_get_a_consumer_span_under_the_writer() -> None:
    exporter = memory_spans()
    writer = trace.get_tracer("test")
    with writer.start_as_current_span("publish") as parent:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
    headers = [(k, v.encode()) for k, v in carrier.items()]
    reader = Reader("unused:9092", "gateway")
    inside: list[int] = []

    def note(_key: str, _record: object) -> None:
        inside.append(trace.get_current_span().get_span_context().span_id)

    table = reader.table("a", (FunctionSpec,), on_change=note)
    quiet = reader.table("b", (FunctionSpec,), traced=False)
    attach(reader, table, quiet)
    reader._hand_over({A0: [rec("a", 0, b"x", spec("x"), headers), rec("a", 1, b"y", spec("y"))]})
    reader._hand_over({B0: [rec("b", 0, b"x", spec("x"), headers)]})
    spans = [s for s in exporter.get_finished_spans() if s.name.endswith(" read")]
    assert len(spans) == 1  # not for the record without context, nor on the untraced view
    [span] = spans
    assert span.name == "a read" and span.kind == SpanKind.CONSUMER
    assert span.parent is not None and span.parent.span_id == parent.get_span_context().span_id
    assert span.context.trace_id == parent.get_span_context().trace_id
    assert span.attributes is not None and span.attributes["stoker.reader"] == "gateway"
    assert inside[0] == span.context.span_id  # current while the callback ran


def test_trace_context_only_when_a_traceparent_is_there() -> None:
    assert trace_context(None) is None
    assert trace_context([("other", b"x")]) is None
    ctx = trace_context([("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")])
    assert ctx is not None
    assert trace.get_current_span(ctx).get_span_context().trace_id == 0x0AF7651916CD43DD8448EB211C80319C
