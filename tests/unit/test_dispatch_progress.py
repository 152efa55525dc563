"""Unit tests of the dispatcher's commit watermark and of folding its dispatch records."""

from __future__ import annotations

from events import CodeSource, Execute, FunctionSpec, InvocationRequested, codec
from events.dispatch import DispatchState, InvocationQueued, InvocationSent
from events.work import SOURCE_HEADER, source_header
from services.dispatcher.progress import PartitionProgress, Progress
from services.dispatcher.recovery import PartitionState, fold, merge, sent_of


def test_the_commit_stops_at_the_oldest_record_not_handed_on() -> None:
    p = PartitionProgress()
    for offset in (10, 11, 12, 13):
        p.begin(offset)
    assert p.to_commit() is None
    p.done(11)
    p.done(13)
    assert p.to_commit() is None  # 10 is not handed on: nothing after it may be committed
    p.done(10)
    assert p.to_commit() == 12  # 10 and 11; 12 still holds back 13
    p.committed(12)
    assert p.to_commit() is None
    p.done(12)
    assert p.to_commit() == 14 and p.pending == 0


def test_progress_per_partition_and_dropping_a_revoked_one() -> None:
    progress = Progress()
    progress.of(0).begin(5)
    progress.of(1).begin(7)
    progress.of(0).done(5)
    assert progress.to_commit() == {0: 6}
    progress.committed({0: 6})
    assert progress.to_commit() == {} and progress.pending == 1
    progress.drop(1)
    assert progress.pending == 0


def test_fold_keeps_the_latest_state_per_id_and_drops_ended_ones() -> None:
    a, b = InvocationRequested(id="a", function="f"), InvocationRequested(id="b", function="f")
    queued = InvocationQueued(invocation=a, source_offset=1, since_ms=100)
    sent = InvocationSent(invocation=a, source_offset=1, node="n", incarnation="i", dispatched_ms=200)
    other = InvocationSent(invocation=b, source_offset=2, node="n", incarnation="i", dispatched_ms=150)
    states, problems = fold(
        [
            (b"a", codec.encode(queued)),
            (b"b", codec.encode(other)),
            (b"a", codec.encode(sent)),
            (b"b", None),  # b ended
            (None, b"{}"),
            (b"c", b"not json"),
        ]
    )
    assert states == {"a": sent}
    assert len(problems) == 2
    state = PartitionState(0, states, resume_ms=180)
    assert state.oldest_ms == 180
    assert PartitionState(0, {"a": queued}).oldest_ms == 100
    assert PartitionState(0).oldest_ms is None


def _execute(inv: InvocationRequested, attempt: int = 1) -> bytes:
    spec = FunctionSpec(name=inv.function, entrypoint="h:main", source=CodeSource(digest="sha256:" + "ab" * 32))
    return codec.encode(Execute(invocation=inv, spec=spec, incarnation="n-1", attempt=attempt, dispatched_ms=1234))


def test_an_execute_past_the_committed_offset_is_found_by_its_source_header() -> None:
    inv = InvocationRequested(function="f")
    value = _execute(inv)
    after = {2: 100}
    hit = sent_of("runtime-0", [("traceparent", b"x"), (SOURCE_HEADER, source_header(2, 105))], value, after)
    assert hit is not None
    partition, sent = hit
    assert partition == 2
    assert (sent.invocation.id, sent.node, sent.incarnation, sent.source_offset, sent.dispatched_ms) == (
        inv.id,
        "runtime-0",
        "n-1",
        105,
        1234,
    )
    # Before the committed offset (recorded or ended), another partition, no header, a bad header: not ours.
    assert sent_of("runtime-0", [(SOURCE_HEADER, source_header(2, 99))], value, after) is None
    assert sent_of("runtime-0", [(SOURCE_HEADER, source_header(3, 105))], value, after) is None
    assert sent_of("runtime-0", None, value, after) is None
    assert sent_of("runtime-0", [(SOURCE_HEADER, b"2-105")], value, after) is None
    # A command that does not decode is skipped (its invocation is dispatched again when re-read).
    assert sent_of("runtime-0", [(SOURCE_HEADER, source_header(2, 105))], b"{not json", after) is None


def test_merge_takes_found_work_unless_a_record_knows_as_much() -> None:
    a, b, c, d = (InvocationRequested(id=i, function="f") for i in "abcd")
    states: dict[str, DispatchState] = {
        "a": InvocationSent(invocation=a, source_offset=1, node="n", incarnation="i", attempt=1),
        "b": InvocationSent(invocation=b, source_offset=2, node="n", incarnation="i", attempt=1),
        "c": InvocationQueued(invocation=c, source_offset=3),
    }
    found = [
        InvocationSent(invocation=a, source_offset=1, node="n", incarnation="i", attempt=1),  # recorded already
        InvocationSent(invocation=b, source_offset=2, node="m", incarnation="j", attempt=2),  # a later retry
        InvocationSent(invocation=c, source_offset=3, node="n", incarnation="i", attempt=1),  # sent after queued
        InvocationSent(invocation=d, source_offset=4, node="n", incarnation="i", attempt=1),  # never recorded
    ]
    assert merge(states, found) == {"b", "c", "d"}
    assert isinstance(states["c"], InvocationSent) and states["b"].attempt == 2 and states["d"].source_offset == 4
    assert states["a"] is not found[0]
