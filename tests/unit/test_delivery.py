"""The one rule for where a result goes (services.common.delivery)."""

from __future__ import annotations

from events import InvocationCompleted
from services.common.delivery import ResultWrite, result_writes


def _result() -> InvocationCompleted:
    return InvocationCompleted(id="inv-1", function="f", status="ok")


def test_a_result_goes_to_the_results_topic_keyed_by_its_id() -> None:
    result = _result()
    assert result_writes(result, "stoker.result", None) == [ResultWrite("stoker.result", result, "inv-1")]


def test_a_reply_topic_gets_a_second_copy_after_the_results_topic() -> None:
    result = _result()
    writes = result_writes(result, "stoker.result", "my.replies")
    assert [(w.topic, w.key, w.reply) for w in writes] == [
        ("stoker.result", "inv-1", False),
        ("my.replies", "inv-1", True),
    ]
    assert all(w.record is result for w in writes)


def test_an_empty_reply_topic_is_no_reply_topic() -> None:
    assert len(result_writes(_result(), "stoker.result", "")) == 1
