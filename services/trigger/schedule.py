"""Pure cron decisions: which slot is due, given what was last fired (cronsim for the calendar).

A slot is a scheduled instant (epoch ms). The active scheduler fires a slot once it is due and
records it (``trigger.fired``, in the same transaction as the invocation); what it fires next
depends only on that record, the trigger and the clock, so a restarted or new active copy fires
exactly the slots the old one had not recorded.

Catch-up: after an outage or a pause, ``once`` fires the latest missed slot once (several missed
slots collapse into that one firing); ``none`` fires only slots that are due now (within
:data:`GRACE_MS`), skipping the missed ones.
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

GRACE_MS = 60_000
"""With ``catch_up=none``, a slot that became due less than this ago still fires (a tick or a
failover may take a few seconds); older ones are skipped."""
_SCAN_LIMIT = 100_000


class ScheduleError(ValueError):
    """A cron expression or time zone that cannot be used; the message says why."""


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ScheduleError(f"unknown time zone {name!r}") from exc


def validate(expression: str, timezone: str = "UTC") -> None:
    """Raise :class:`ScheduleError` for an expression or zone cronsim would not accept."""
    if len(expression.split()) not in (5, 6):
        raise ScheduleError(
            f"a cron expression has five fields (minute hour day month weekday), or six with seconds first: "
            f"{expression!r}"
        )
    try:
        CronSim(expression, datetime.now(zone(timezone)))
    except CronSimError as exc:
        raise ScheduleError(f"bad cron expression {expression!r}: {exc}") from exc


def slots_after(expression: str, timezone: str, after_ms: int, limit: int) -> list[int]:
    """Up to ``limit`` slots strictly after ``after_ms``."""
    start = datetime.fromtimestamp(after_ms / 1000, tz=UTC).astimezone(zone(timezone))
    it = CronSim(expression, start)
    out: list[int] = []
    for when in it:
        ms = int(when.timestamp() * 1000)
        if ms <= after_ms:
            continue
        out.append(ms)
        if len(out) >= limit:
            break
    return out


def next_slot(expression: str, timezone: str, after_ms: int) -> int | None:
    found = slots_after(expression, timezone, after_ms, 1)
    return found[0] if found else None


def due_slot(
    expression: str,
    timezone: str,
    *,
    last_fired_ms: int | None,
    since_ms: int,
    now_ms: int,
    catch_up: str,
) -> int | None:
    """The one slot to fire now, or None.

    ``last_fired_ms`` is the slot last recorded for this trigger's revision (None: never fired);
    ``since_ms`` is when the revision was made: no slot at or before it fires.
    """
    after = max(since_ms, last_fired_ms) if last_fired_ms is not None else since_ms
    if catch_up == "none":
        after = max(after, now_ms - GRACE_MS - 1)  # missed slots are skipped: do not even walk them
    latest: int | None = None
    scanned = 0
    cursor = after
    # Walk the due slots (in pages) to find the latest one at or before now.
    while scanned < _SCAN_LIMIT:
        page = slots_after(expression, timezone, cursor, 500)
        due = [s for s in page if s <= now_ms]
        if due:
            latest = due[-1]
        if len(due) < len(page) or not page:
            break
        cursor = page[-1]
        scanned += len(page)
    return latest
