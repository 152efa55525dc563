"""API tokens: making them, checking them, what their scopes allow, and how fast they may be used. Pure.

A token is ``stk_<id>_<secret>``: the id (public: listed, logged, carried with invocations) finds its
record, and the SHA-256 of the whole string, compared in constant time, proves it. Scopes:

========================  ===============================================================================
``invoke:GLOB``           invoke functions and workflows whose name matches GLOB (``fnmatch``: ``orders-*``)
``deploy:GLOB``           create, change, delete and prewarm functions and workflows matching GLOB
``read``                  read everything: functions, workflows, builds and logs, nodes, results, metrics
``admin``                 all of the above, nodes (label, taint, cordon, drain), isolation, and tokens
========================  ===============================================================================
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from events import TokenIssued, TokenRevoked
from services.common.telemetry import TokenBucket

PREFIX = "stk_"
TOKEN = re.compile(r"^stk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
SCOPE = re.compile(r"^(?:read|admin|(?:invoke|deploy):[A-Za-z0-9*?\[\]!_.-]{1,128})$")


class AuthError(Exception):
    """Why a request is refused: 401 (who are you), 403 (not allowed), 429 (too often)."""

    def __init__(self, status: int, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after_s = status, message, retry_after_s


def digest_of(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str, str]:
    """(token, id, digest) of a new random token; only the digest is ever stored."""
    ident = secrets.token_hex(6)
    token = f"{PREFIX}{ident}_{secrets.token_urlsafe(32)}"
    return token, ident, digest_of(token)


def check_scopes(scopes: list[str]) -> list[str]:
    """The scopes if each is well formed; ValueError naming the first that is not."""
    if not scopes:
        raise ValueError("a token needs at least one scope")
    for scope in scopes:
        if not SCOPE.match(scope):
            raise ValueError(f"bad scope {scope!r}: use invoke:GLOB, deploy:GLOB, read or admin")
    return scopes


def bearer(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, or :class:`AuthError` (401)."""
    if authorization is None:
        raise AuthError(401, "this needs a token: send Authorization: Bearer <token>")
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthError(401, "malformed Authorization header: use Authorization: Bearer <token>")
    return value.strip()


@dataclass(frozen=True)
class Principal:
    """Who is asking, as their token says."""

    id: str
    name: str
    scopes: tuple[str, ...]
    rate_per_s: float | None

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def can_read(self) -> bool:
        return self.admin or "read" in self.scopes

    def _matches(self, verb: str, name: str) -> bool:
        return self.admin or any(
            s.startswith(f"{verb}:") and fnmatch.fnmatchcase(name, s.split(":", 1)[1]) for s in self.scopes
        )

    def can_invoke(self, name: str) -> bool:
        return self._matches("invoke", name)

    def can_deploy(self, name: str) -> bool:
        return self._matches("deploy", name)

    def label(self) -> str:
        """How the principal is named in logs, traces and the audit trail."""
        return f"{self.id} ({self.name})" if self.name else self.id


def verify(token: str, lookup: Callable[[str], TokenIssued | TokenRevoked | None], now_ms: int) -> Principal:
    """The principal of ``token``, or :class:`AuthError` (401) if it is malformed, unknown, revoked or expired."""
    match = TOKEN.match(token)
    if match is None:
        raise AuthError(401, "not a Stoker token (stk_<id>_<secret>)")
    record = lookup(match.group(1))
    if record is None:
        raise AuthError(401, "unknown token")
    if isinstance(record, TokenRevoked):
        raise AuthError(401, "this token was revoked")
    if not hmac.compare_digest(record.digest, digest_of(token)):
        raise AuthError(401, "unknown token")
    if record.expires_ms is not None and record.expires_ms <= now_ms:
        raise AuthError(401, "this token expired")
    return Principal(record.id, record.name, tuple(record.scopes), record.rate_per_s)


class RateLimits:
    """A token bucket per key (a token id, or a client address for failed attempts), the least recently
    used forgotten past ``max_keys``."""

    def __init__(self, default_per_s: float, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic):
        self.default_per_s = default_per_s
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._max_keys = max_keys

    def take(self, key: str, per_s: float | None = None) -> None:
        """Count one request of ``key``; :class:`AuthError` (429, with when to retry) when over its rate."""
        rate = self.default_per_s if per_s is None else per_s
        if rate <= 0:
            return  # no limit
        bucket = self._buckets.get(key)
        if bucket is None or bucket.per_s != rate:
            bucket = self._buckets[key] = TokenBucket(rate, clock=self._clock)
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(key)
        if not bucket.take():
            raise AuthError(429, f"over the rate of {rate:g} requests a second", retry_after_s=1.0 / rate)


def scope_table() -> Mapping[str, str]:
    """What each scope allows (for ``stoker token --help`` and the README)."""
    return {
        "invoke:GLOB": "invoke functions and workflows whose name matches GLOB",
        "deploy:GLOB": "create, change, delete and prewarm functions and workflows matching GLOB",
        "read": "read everything: functions, workflows, builds and logs, nodes, results, metrics",
        "admin": "everything, including nodes, isolation and tokens",
    }
