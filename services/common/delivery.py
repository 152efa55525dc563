"""Where an invocation's result is written: one rule for the agent, the dispatcher and the workflow engine.

Pure: it names the writes, each caller makes them with its own producer (the agent's result
writer, the dispatcher's ordered sends, the workflow engine's transaction).
"""

from __future__ import annotations

from dataclasses import dataclass

from events import InvocationCompleted

__all__ = ["ResultWrite", "result_writes"]


@dataclass(frozen=True)
class ResultWrite:
    """One copy of a result to write."""

    topic: str
    record: InvocationCompleted
    key: str
    """The invocation's id: every copy of one result lands on the same partition of its topic."""
    reply: bool = False
    """The copy for the caller's ``reply_to`` topic (not the platform's results topic)."""


def result_writes(result: InvocationCompleted, results_topic: str, reply_to: str | None) -> list[ResultWrite]:
    """The writes that deliver ``result``: to ``results_topic``, then to ``reply_to`` when the caller named one."""
    writes = [ResultWrite(results_topic, result, result.id)]
    if reply_to:
        writes.append(ResultWrite(reply_to, result, result.id, reply=True))
    return writes
