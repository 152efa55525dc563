"""Unit tests of the dispatcher's commit watermark and of folding its dispatch records."""

from __future__ import annotations

from events import InvocationRequested, codec
from events.dispatch import InvocationQueued, InvocationSent
from services.dispatcher.progress import PartitionProgress, Progress
from services.dispatcher.recovery import PartitionState, fold


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
