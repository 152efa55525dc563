"""The access family: API tokens (compacted ``token`` topic, key = token id).

A token is ``stk_<id>_<secret>``; only the SHA-256 of the whole string is stored, so the topic can be
read by every gateway without handing anyone a usable secret. ``token.revoked`` replaces a token's
``token.issued`` under the same key (the latest record wins), so a revoked token stays listed as such.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from events.base import Record, now_ms


class TokenIssued(Record):
    type: Literal["token.issued"] = "token.issued"
    id: str
    name: str = ""
    scopes: list[str]
    """``invoke:GLOB``, ``deploy:GLOB``, ``read`` or ``admin`` (see ``services.common.auth``)."""
    digest: str
    """SHA-256 (hex) of the token string."""
    rate_per_s: float | None = None
    """Requests a second this token may make (bursts of as many); ``None``: the gateway's default, 0: no limit."""
    expires_ms: int | None = None
    by: str = ""
    """Who created it: a token id, or ``stoker up`` for the first admin token."""
    created_ms: int = Field(default_factory=now_ms)


class TokenRevoked(Record):
    type: Literal["token.revoked"] = "token.revoked"
    id: str
    name: str = ""
    by: str = ""
    at_ms: int = Field(default_factory=now_ms)


class AuditRecorded(Record):
    """One management action through the gateway (``audit`` topic, key = principal): who did what, and how it went.

    Invocations are not audited one by one: each carries its ``principal`` on its own records.
    """

    type: Literal["audit.recorded"] = "audit.recorded"
    principal: str
    """The token id (and its name, if it has one)."""
    method: str
    path: str
    status: int
    at_ms: int = Field(default_factory=now_ms)
