"""SpanFiles: the trace files read as they grow, a half-written line left for the next read."""

from __future__ import annotations

from pathlib import Path

from services.cli.tracefile import SpanFiles


def test_each_read_takes_only_what_was_appended_and_whole_lines(tmp_path: Path) -> None:
    files = SpanFiles(tmp_path, keep=3)
    assert files.spans() == []
    path = tmp_path / "gateway-1.jsonl"
    path.write_bytes(b'{"n": 1}\n{"n": 2}\n{"n": 3')  # the third is still being written
    assert [s["n"] for s in files.spans()] == [1, 2]
    with path.open("ab") as fh:
        fh.write(b"}\nnot json\n")
    (tmp_path / "agent-2.jsonl").write_bytes(b'{"n": 4}\n')
    assert [s["n"] for s in files.spans()] == [2, 4, 3]  # the oldest forgotten past keep=3
    assert [s["n"] for s in files.spans()] == [2, 4, 3]  # nothing new: nothing read twice
