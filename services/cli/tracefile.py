"""Reading spans back from the local trace files and printing one trace as a tree."""

from __future__ import annotations

from collections import defaultdict, deque
from pathlib import Path
from typing import Any

import orjson
from rich.tree import Tree

from services.common.telemetry import INVOCATION_ID


def load_spans(traces_dir: Path) -> list[dict[str, Any]]:
    spans = []
    for path in sorted(traces_dir.glob("*.jsonl")):
        with path.open("rb") as fh:
            for line in fh:
                try:
                    spans.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    continue  # a line being written right now
    return spans


class SpanFiles:
    """The spans of the trace files, read as they grow: each call reads only what was appended since the
    last (a page asking again for a trace does not read every file again), the oldest forgotten past ``keep``."""

    def __init__(self, traces_dir: Path, keep: int = 200_000) -> None:
        self.traces_dir = traces_dir
        self._offsets: dict[Path, int] = {}
        self._spans: deque[dict[str, Any]] = deque(maxlen=keep)

    def spans(self) -> list[dict[str, Any]]:
        for path in sorted(self.traces_dir.glob("*.jsonl")):
            at = self._offsets.get(path, 0)
            with path.open("rb") as fh:
                fh.seek(at)
                for line in fh:
                    if not line.endswith(b"\n"):
                        break  # a line being written right now: read it next time, whole
                    at += len(line)
                    try:
                        self._spans.append(orjson.loads(line))
                    except orjson.JSONDecodeError:
                        continue
            self._offsets[path] = at
        return list(self._spans)


def trace_ids_for(spans: list[dict[str, Any]], ident: str) -> list[str]:
    """Trace ids that ``ident`` names: an invocation id, or a trace id itself."""
    ids = {s["trace_id"] for s in spans if s.get("attributes", {}).get(INVOCATION_ID) == ident}
    ids |= {s["trace_id"] for s in spans if s.get("attributes", {}).get("messaging.message.id") == ident}
    if not ids and any(s["trace_id"] == ident for s in spans):
        ids = {ident}
    return sorted(ids)


def build_tree(spans: list[dict[str, Any]], trace_id: str) -> Tree:
    mine = [s for s in spans if s["trace_id"] == trace_id]
    by_id = {s["span_id"]: s for s in mine}
    children: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for s in mine:
        parent = s.get("parent_id")
        children[parent if parent in by_id else None].append(s)
    t0 = min((s["start_ns"] for s in mine), default=0)
    root = Tree(f"trace {trace_id}  ({len(mine)} spans)")

    def label(s: dict[str, Any]) -> str:
        dur = (s["end_ns"] - s["start_ns"]) / 1e6
        at = (s["start_ns"] - t0) / 1e6
        attrs = s.get("attributes", {})
        extra = " ".join(
            f"{k.split('.')[-1]}={attrs[k]}"
            for k in ("stoker.node", "stoker.start", "stoker.instance", "stoker.principal")
            if k in attrs
        )
        status = "" if s.get("status") in ("UNSET", "OK") else f" [red]{s.get('status')}[/red]"
        links = "".join(f" [magenta]-> linked trace {link['trace_id']}[/magenta]" for link in s.get("links", []))
        return f"[bold]{s['name']}[/bold] [dim]{s.get('service')}[/dim] +{at:.2f}ms {dur:.2f}ms {extra}{status}{links}"

    def add(node: Tree, parent: str | None) -> None:
        for s in sorted(children.get(parent, []), key=lambda s: s["start_ns"]):
            add(node.add(label(s)), s["span_id"])

    add(root, None)
    return root


def linked_traces(spans: list[dict[str, Any]], trace_id: str) -> list[str]:
    """Traces that spans of ``trace_id`` link to (a prewarmed start links to its build trace)."""
    found: list[str] = []
    for s in spans:
        if s["trace_id"] == trace_id:
            for link in s.get("links", []):
                if link["trace_id"] != trace_id and link["trace_id"] not in found:
                    found.append(link["trace_id"])
    return found
