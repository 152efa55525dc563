"""Unit tests of services.cli.monitor.summarize: one readable line per record value."""

from __future__ import annotations

import orjson
import pytest

from events import (
    DeadLettered,
    InstanceChanged,
    InstanceSummary,
    InvocationCompleted,
    InvocationRequested,
    NodeHeartbeat,
    Timings,
    encode,
)
from services.cli.monitor import summarize


def test_tombstone() -> None:
    assert summarize(None) == "(tombstone)"
    assert summarize(b"") == "(tombstone)"


def test_not_json() -> None:
    line = summarize(b"\x00garbage" + b"x" * 500)
    assert line.startswith("(not JSON) ")
    assert len(line) < 160  # the value is cut


def test_json_that_is_not_an_object() -> None:
    assert summarize(b"[1, 2, 3]") == "[1, 2, 3]"
    assert summarize(b"42") == "42"
    assert len(summarize(orjson.dumps(list(range(1000))))) == 200


def test_invocation_requested() -> None:
    inv = InvocationRequested(id="abc", function="hello", payload={"big": "x" * 100})
    assert summarize(encode(inv)) == "invocation.requested function=hello id=abc"


def test_invocation_completed() -> None:
    done = InvocationCompleted(
        id="abc",
        function="hello",
        status="ok",
        start="warm",
        node="runtime-0",
        instance="i-1",
        timings_ms=Timings(total=12.5),
    )
    assert summarize(encode(done)) == (
        "invocation.completed function=hello status=ok start=warm node=runtime-0 instance=i-1 id=abc total=12.5ms"
    )


def test_empty_fields_are_left_out() -> None:
    changed = InstanceChanged(node="n", incarnation="inc", instance="i-1", state="generic", reason="")
    assert summarize(encode(changed)) == "instance.changed node=n state=generic instance=i-1 incarnation=inc"


def test_node_heartbeat_counts_instance_states() -> None:
    hb = NodeHeartbeat(
        node="n",
        incarnation="inc",
        instances=[
            InstanceSummary(instance="1", state="ready"),
            InstanceSummary(instance="2", state="busy"),
            InstanceSummary(instance="3", state="ready"),
            InstanceSummary(instance="4", state="generic"),
        ],
    )
    assert summarize(encode(hb)) == "node.heartbeat node=n incarnation=inc instances=busy:1,generic:1,ready:2"
    empty = NodeHeartbeat(node="n", incarnation="inc")
    assert summarize(encode(empty)).endswith(" instances=0")


def test_dead_letter_says_where_from() -> None:
    dl = DeadLettered(source_topic="stoker.invocation", partition=2, offset=17, reason="bad", value="{")
    line = summarize(encode(dl))
    assert line.startswith("record.dead-lettered reason=bad")
    assert line.endswith("from=stoker.invocation[2]@17")


def test_object_without_type() -> None:
    assert summarize(b'{"function": "f"}') == "? function=f"


@pytest.mark.parametrize(
    "value",
    [
        b'{"type": "invocation.completed", "id": "x", "timings_ms": null}',
        b'{"type": "node.heartbeat", "node": "n", "instances": null}',
    ],
)
def test_malformed_known_types_do_not_crash(value: bytes) -> None:
    """``summarize`` handles any bytes (it tails every topic, DLQ-bound garbage included).

    Exposes a bug: for ``invocation.completed`` with ``"timings_ms": null`` it calls
    ``None.get`` (``obj.get('timings_ms', {})`` returns None when the key is present), and for
    ``node.heartbeat`` with ``"instances": null`` it iterates None: one bad record on a topic
    stops ``stoker monitor`` with a traceback.
    """
    line = summarize(value)
    assert isinstance(line, str)
    assert line.split(" ", 1)[0] in ("invocation.completed", "node.heartbeat")
