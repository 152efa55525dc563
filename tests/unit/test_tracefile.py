"""Unit tests of services.cli.tracefile: finding traces and building the span tree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from rich.tree import Tree

from services.cli.tracefile import build_tree, load_spans, trace_ids_for
from services.common.telemetry import INVOCATION_ID

T1, T2, T3 = "a" * 32, "b" * 32, "c" * 32


def span(
    trace: str,
    sid: str,
    parent: str | None,
    name: str,
    start: int,
    end: int | None = None,
    service: str = "gateway",
    status: str = "UNSET",
    **attrs: Any,
) -> dict[str, Any]:
    return {
        "trace_id": trace,
        "span_id": sid,
        "parent_id": parent,
        "name": name,
        "service": service,
        "start_ns": start,
        "end_ns": end if end is not None else start + 1_000_000,
        "status": status,
        "attributes": attrs,
    }


def spans() -> list[dict[str, Any]]:
    return [
        span(T1, "s1", None, "POST /fn/hello", 1_000_000, 9_000_000, **{INVOCATION_ID: "inv-1"}),
        span(T1, "s3", "s1", "publish invocation", 3_000_000, 3_500_000),
        span(T1, "s2", "s1", "validate", 2_000_000, 2_250_000),
        span(
            T1,
            "s4",
            "s3",
            "execute",
            4_000_000,
            8_000_000,
            service="agent",
            status="ERROR",
            **{"stoker.node": "runtime-0", "stoker.start": "warm", INVOCATION_ID: "inv-1"},
        ),
        span(T1, "s5", "remote-parent", "orphan", 1_500_000),
        span(T2, "x1", None, "dispatch", 5_000, **{"messaging.message.id": "msg-9"}),
        span(T3, "y1", None, "other", 1, **{INVOCATION_ID: "inv-3"}),
        span(T2, "x2", None, "retry", 6_000, **{INVOCATION_ID: "inv-1"}),
    ]


def labels(tree: Tree) -> list[Any]:
    """Nested [label, [children...]] structure of a rich Tree."""
    return [str(tree.label), [labels(c) for c in tree.children]]


def test_trace_ids_for_invocation_id() -> None:
    assert trace_ids_for(spans(), "inv-1") == sorted([T1, T2])
    assert trace_ids_for(spans(), "inv-3") == [T3]


def test_trace_ids_for_message_id() -> None:
    assert trace_ids_for(spans(), "msg-9") == [T2]


def test_trace_ids_for_trace_id_itself() -> None:
    assert trace_ids_for(spans(), T3) == [T3]


def test_trace_ids_for_unknown() -> None:
    assert trace_ids_for(spans(), "nothing") == []
    assert trace_ids_for([], "inv-1") == []


def test_trace_ids_for_spans_without_attributes() -> None:
    bare = [{"trace_id": T1, "span_id": "s"}]
    assert trace_ids_for(bare, T1) == [T1]
    assert trace_ids_for(bare, "inv") == []


def test_build_tree_structure_and_order() -> None:
    tree = build_tree(spans(), T1)
    assert str(tree.label) == f"trace {T1}  (5 spans)"
    top = tree.children
    # The root span and the span whose parent is not in this trace are both top level, by start.
    assert [str(c.label).split("[/bold]")[0] for c in top] == ["[bold]POST /fn/hello", "[bold]orphan"]
    root = top[0]
    assert [str(c.label).split("[/bold]")[0] for c in root.children] == ["[bold]validate", "[bold]publish invocation"]
    publish = root.children[1]
    assert len(publish.children) == 1
    execute = publish.children[0]
    assert execute.children == []
    assert top[1].children == []


def test_build_tree_labels() -> None:
    tree = build_tree(spans(), T1)
    root = str(tree.children[0].label)
    assert root == "[bold]POST /fn/hello[/bold] [dim]gateway[/dim] +0.00ms 8.00ms "
    execute = str(tree.children[0].children[1].children[0].label)
    assert "[bold]execute[/bold] [dim]agent[/dim]" in execute
    assert "+3.00ms 4.00ms" in execute
    assert "node=runtime-0" in execute
    assert "start=warm" in execute
    assert execute.endswith("[red]ERROR[/red]")
    validate = str(tree.children[0].children[0].label)
    assert "+1.00ms 0.25ms" in validate
    assert "[red]" not in validate


def test_build_tree_only_its_own_trace() -> None:
    tree = build_tree(spans(), T2)
    assert str(tree.label) == f"trace {T2}  (2 spans)"
    assert [str(c.label).split("[/bold]")[0] for c in tree.children] == ["[bold]dispatch", "[bold]retry"]


def test_build_tree_unknown_trace_is_empty() -> None:
    tree = build_tree(spans(), "f" * 32)
    assert str(tree.label) == f"trace {'f' * 32}  (0 spans)"
    assert tree.children == []


def test_build_tree_counts_every_span() -> None:
    def count(t: Tree) -> int:
        return sum(1 + count(c) for c in t.children)

    assert count(build_tree(spans(), T1)) == 5


def test_load_spans_skips_partial_lines(tmp_path: Path) -> None:
    a = spans()[:2]
    (tmp_path / "gateway-1.jsonl").write_bytes(b"".join(orjson.dumps(s) + b"\n" for s in a))
    (tmp_path / "agent-2.jsonl").write_bytes(orjson.dumps(spans()[3]) + b"\n" + b'{"trace_id": "trunc')
    (tmp_path / "notes.txt").write_bytes(orjson.dumps(spans()[5]) + b"\n")
    loaded = load_spans(tmp_path)
    # Files in name order (agent-2 before gateway-1); the partial line and other files are skipped.
    assert [s["span_id"] for s in loaded] == ["s4", "s1", "s3"]
    assert loaded[0] == spans()[3]
    assert load_spans(tmp_path / "missing") == []
