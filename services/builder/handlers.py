"""The builder's handlers: what each record it reads leads to (thin; the work is in the core)."""

from __future__ import annotations

from events import CodeCommitted
from services.builder.core import Builder


async def on_code_committed(core: Builder, event: CodeCommitted) -> None:
    """A push (from a webhook or ``stoker push``): build the functions it touches."""
    await core.on_code_committed(event)
