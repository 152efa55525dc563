"""The trigger service's pure logic: events to functions, commit watermarks, lanes, retries, cron slots."""

from __future__ import annotations

import asyncio
import base64
from datetime import datetime
from zoneinfo import ZoneInfo

import orjson
import pytest
from pydantic import ValidationError

from events import InvocationCompleted, codec
from events.triggers import TriggerFailed, TriggerSpec, cron_invocation_id, record_invocation_id
from services.trigger import delivery, schedule
from services.trigger.payload import SourceRecord, event_of, trace_carrier
from services.trigger.results import ResultBook, is_trigger_result


def ms(text: str, tz: str = "UTC") -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp() * 1000)


# ----- what the function receives ------------------------------------------------------------------


def test_a_json_value_is_passed_decoded_with_every_coordinate() -> None:
    rec = SourceRecord("orders", 2, 41, b"o-1", b'{"total": 3}', [("h", b"v")], 1_700_000_000_000)
    event = event_of(rec, "t")
    assert event == {
        "value": {"total": 3},
        "value_encoding": "json",
        "key": "o-1",
        "key_encoding": "utf-8",
        "headers": {"h": "v"},
        "topic": "orders",
        "partition": 2,
        "offset": 41,
        "timestamp": 1_700_000_000_000,
        "trigger": "t",
    }


def test_bytes_that_are_not_json_are_passed_as_base64_with_a_flag() -> None:
    raw = b"\x00\xffnot json"
    event = event_of(SourceRecord("raw", 0, 0, b"\xfe", raw, [("bin", b"\xff")]), "t")
    assert event["value_encoding"] == "base64" and base64.b64decode(event["value"]) == raw
    assert event["key_encoding"] == "base64" and base64.b64decode(event["key"]) == b"\xfe"
    assert event["headers_base64"] == ["bin"]
    assert event_of(SourceRecord("raw", 0, 0, None, b"plain text"), "t")["value_encoding"] == "base64"
    assert event_of(SourceRecord("raw", 0, 0, None, None), "t")["value"] is None


def test_the_source_trace_context_is_carried_over() -> None:
    parent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    rec = SourceRecord("o", 0, 0, None, b"1", [("traceparent", parent), ("other", b"x")])
    assert trace_carrier(rec) == {"traceparent": parent.decode()}
    assert trace_carrier(SourceRecord("o", 0, 0, None, b"1")) == {}


def test_invocation_ids_are_deterministic_per_record_and_attempt() -> None:
    assert record_invocation_id("t", "orders", 1, 7) == "trg.t.orders-1-7"
    assert record_invocation_id("t", "orders", 1, 7, attempt=3) == "trg.t.orders-1-7.r3"
    assert cron_invocation_id("nightly", 1_700_000_000_000) == "cron.nightly.1700000000000"
    assert is_trigger_result(b"trg.t.orders-1-7") and not is_trigger_result(b"cron.x.1")
    assert not is_trigger_result(None)


# ----- commits: only as far as results are recorded ------------------------------------------------


def test_a_partition_commits_only_the_recorded_prefix() -> None:
    progress = delivery.PartitionProgress(position=10)
    for offset in (10, 11, 12):
        progress.begin(offset, now_ms=1_000 + offset)
    progress.recorded(11)
    progress.recorded(12)
    assert progress.position == 10 and progress.pending == 3  # 10 is not recorded: nothing past it
    position, metadata = progress.to_commit(now_ms=5_000)  # type: ignore[misc]
    assert position == 10 and delivery.since_of(metadata) == 1_010  # the oldest open record's start
    progress.committed = 10
    assert progress.to_commit(now_ms=5_000) is None
    progress.recorded(10)
    position, metadata = progress.to_commit(now_ms=6_000)  # type: ignore[misc]
    assert position == 13 and delivery.since_of(metadata) == 6_000 and progress.pending == 0


def test_commit_metadata_from_elsewhere_is_not_trusted() -> None:
    assert delivery.since_of("") is None
    assert delivery.since_of("written by a person") is None
    assert delivery.since_of('{"since_ms": "soon"}') is None
    assert delivery.since_of(delivery.commit_metadata(42)) == 42


# ----- lanes: per-key order, or none -----------------------------------------------------------------


def test_per_key_lanes_run_one_record_of_a_key_at_a_time() -> None:
    lanes = delivery.Lanes(per_key=True)
    a = delivery.lane_of(0, b"a", 1, True)
    b = delivery.lane_of(0, b"b", 2, True)
    assert lanes.add(a, (0, 1)) is True
    assert lanes.add(b, (0, 2)) is True  # another key does not wait
    assert lanes.add(a, (0, 3)) is False
    assert lanes.add(a, (0, 4)) is False
    assert lanes.waiting() == 2
    assert lanes.finish(a, (0, 1)) == (0, 3)
    assert lanes.finish(a, (0, 3)) == (0, 4)
    assert lanes.finish(a, (0, 4)) is None and lanes.waiting() == 0
    # Same key, other partition: another lane (order is per partition, as Kafka keeps it).
    assert delivery.lane_of(1, b"a", 9, True) != a
    # Records without a key never wait for each other.
    assert delivery.lane_of(0, None, 5, True) != delivery.lane_of(0, None, 6, True)


def test_unordered_lanes_never_hold_a_record_back() -> None:
    lanes = delivery.Lanes(per_key=False)
    lane = delivery.lane_of(0, b"a", 1, False)
    assert all(lanes.add(lane, (0, i)) for i in range(5))
    assert lanes.finish(lane, (0, 0)) is None


def test_dropping_a_partition_forgets_its_lanes() -> None:
    lanes = delivery.Lanes(per_key=True)
    lanes.add(delivery.lane_of(0, b"a", 1, True), (0, 1))
    lanes.add(delivery.lane_of(0, b"a", 2, True), (0, 2))
    lanes.add(delivery.lane_of(1, b"a", 1, True), (1, 1))
    lanes.drop_partitions({0})
    assert lanes.add(delivery.lane_of(0, b"a", 3, True), (0, 3)) is True
    assert lanes.add(delivery.lane_of(1, b"a", 2, True), (1, 2)) is False


def test_retries_back_off_doubling_then_give_up() -> None:
    assert delivery.after_attempt("ok", 1, 3, 1.0).action == "done"
    steps = [delivery.after_attempt("error", n, 3, 0.5) for n in (1, 2, 3)]
    assert [(s.action, s.delay_s, s.attempt) for s in steps] == [
        ("retry", 0.5, 2),
        ("retry", 1.0, 3),
        ("retry", 2.0, 4),
    ]
    assert delivery.after_attempt("timeout", 4, 3, 0.5).action == "give_up"
    assert delivery.after_attempt("error", 1, 0, 0.5).action == "give_up"  # no retries: straight to errors


# ----- cron slots --------------------------------------------------------------------------------------


def test_the_latest_missed_slot_fires_once_after_an_outage() -> None:
    created = ms("2026-01-01T10:00:00")
    now = ms("2026-01-01T10:17:30")
    slot = schedule.due_slot("*/5 * * * *", "UTC", last_fired_ms=None, since_ms=created, now_ms=now, catch_up="once")
    assert slot == ms("2026-01-01T10:15:00")
    again = schedule.due_slot("*/5 * * * *", "UTC", last_fired_ms=slot, since_ms=created, now_ms=now, catch_up="once")
    assert again is None  # recorded: not fired a second time
    nothing = schedule.due_slot(
        "*/5 * * * *", "UTC", last_fired_ms=None, since_ms=created, now_ms=ms("2026-01-01T10:04:59"), catch_up="once"
    )
    assert nothing is None


def test_catch_up_none_skips_missed_slots_but_fires_one_just_due() -> None:
    created = ms("2026-01-01T10:00:00")
    late = schedule.due_slot(
        "*/5 * * * *", "UTC", last_fired_ms=None, since_ms=created, now_ms=ms("2026-01-01T10:17:30"), catch_up="none"
    )
    assert late is None
    on_time = schedule.due_slot(
        "*/5 * * * *", "UTC", last_fired_ms=None, since_ms=created, now_ms=ms("2026-01-01T10:15:02"), catch_up="none"
    )
    assert on_time == ms("2026-01-01T10:15:00")


def test_a_slot_at_or_before_the_trigger_was_made_never_fires() -> None:
    created = ms("2026-01-01T10:15:00")
    assert (
        schedule.due_slot("*/5 * * * *", "UTC", last_fired_ms=None, since_ms=created, now_ms=created, catch_up="once")
        is None
    )


def test_schedules_are_read_in_their_time_zone_across_dst() -> None:
    # 02:30 does not exist in Berlin on 2026-03-29 (clocks jump 02:00 -> 03:00); cronsim fires it at 03:00.
    berlin = "Europe/Berlin"
    after = ms("2026-03-28T12:00:00", berlin)
    slots = schedule.slots_after("30 2 * * *", berlin, after, 2)
    assert slots[0] == ms("2026-03-29T03:00:00", berlin)
    assert slots[1] == ms("2026-03-30T02:30:00", berlin)
    assert schedule.next_slot("0 9 * * *", berlin, after) == ms("2026-03-29T09:00:00", berlin)
    assert ms("2026-03-29T09:00:00", berlin) == ms("2026-03-29T07:00:00")  # CEST is UTC+2


@pytest.mark.parametrize(
    ("expression", "zone", "says"),
    [("61 * * * *", "UTC", "bad cron"), ("* * *", "UTC", "five fields"), ("* * * * *", "Mars/Olympus", "time zone")],
)
def test_bad_schedules_are_refused_with_a_reason(expression: str, zone: str, says: str) -> None:
    with pytest.raises(schedule.ScheduleError, match=says):
        schedule.validate(expression, zone)


# ----- definitions and results --------------------------------------------------------------------------


def test_trigger_specs_validate_and_round_trip() -> None:
    spec = TriggerSpec(name="orders-in", function="handle", topic="orders", error_topic="orders.failed")
    assert spec.consumer_group == "stoker-trigger-orders-in"
    assert codec.decode(codec.encode(spec)) == spec
    assert TriggerSpec(name="x", function="f", group="mine").consumer_group == "mine"
    with pytest.raises(ValidationError):
        TriggerSpec(name="has space", function="f")
    with pytest.raises(ValidationError):
        TriggerSpec(name="x", function="f", ordered="sometimes")  # type: ignore[arg-type]
    failed = TriggerFailed(trigger="t", function="f", source_topic="o", partition=0, offset=1, reason="function_failed")
    assert orjson.loads(codec.encode(failed))["type"] == "trigger.failed"


def test_a_result_that_arrives_before_its_waiter_is_kept_for_it() -> None:
    async def go() -> None:
        book = ResultBook(capacity=2)
        early = InvocationCompleted(id="trg.t.o-0-1", function="f", status="ok", output=1)
        book.on_result(early)
        assert (await book.expect("trg.t.o-0-1")) == early
        waiter = book.expect("trg.t.o-0-2")
        book.on_result(InvocationCompleted(id="trg.t.o-0-2", function="f", status="error"))
        assert (await waiter).status == "error"
        for i in range(3, 6):  # bounded: the oldest unclaimed results go first
            book.on_result(InvocationCompleted(id=f"trg.t.o-0-{i}", function="f", status="ok"))
        assert book.take("trg.t.o-0-3") is None and book.take("trg.t.o-0-5") is not None

    asyncio.run(go())


def test_a_six_field_schedule_has_seconds_first() -> None:
    schedule.validate("*/10 * * * * *")
    after = ms("2026-01-01T10:00:01")
    expected = [ms("2026-01-01T10:00:10"), ms("2026-01-01T10:00:20")]
    assert schedule.slots_after("*/10 * * * * *", "UTC", after, 2) == expected
