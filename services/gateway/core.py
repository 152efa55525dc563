"""The gateway's decisions, without HTTP or Kafka: who may call, what an invocation becomes, what a
caller may read of a result, whether a git push is new.

The FastAPI routes in :mod:`services.gateway.app` are its handlers; they pass requests' parts in
and turn :class:`HttpError` into answers. Writes go through the ``publish`` it is given, whose
failure or silence becomes 503.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

from events import (
    CodeCommitted,
    FunctionSpec,
    InvocationRequested,
    TokenIssued,
    TokenRevoked,
    WorkflowSpec,
    now_ms,
)
from events.base import Record
from services.common import auth
from services.gateway.results import ResultBook
from services.gateway.settings import GatewaySettings

log = logging.getLogger("stoker.gateway")

MAX_CALLERS = 100_000
PRINCIPAL_HEADER = "stoker-principal"
"""The record header of an invocation that names the token it came with."""
INVOKE_PREFIXES = ("/fn/", "/async/fn/")
QUERY_TOKENS = frozenset({"token", "access_token", "api_key", "apikey", "key"})
"""Query parameters refused: a token in a URL ends up in logs."""

R = TypeVar("R", covariant=True)


class HttpError(Exception):
    """An answer other than success: its HTTP status, message and extra body fields."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


class View(Protocol[R]):
    """What the gateway reads of a compacted topic (a :class:`services.common.views.Table`)."""

    @property
    def rows(self) -> Mapping[str, R]: ...

    def get(self, key: str) -> R | None: ...

    async def wait_caught_up(self, timeout_s: float) -> bool: ...


Publish = Callable[[Record, str, bytes | None, dict[str, str] | None], Awaitable[Any]]
"""Write one record (record, topic, key, headers) and wait for the broker's confirmation."""


class Gateway:
    """The invocation path, the results a caller may read, and git pushes, behind the HTTP routes."""

    def __init__(
        self,
        settings: GatewaySettings,
        publish: Publish,
        functions: View[FunctionSpec],
        workflows: View[WorkflowSpec],
        tokens: View[TokenIssued | TokenRevoked],
        book: ResultBook | None = None,
    ) -> None:
        self.settings = settings
        self.topics = settings.common.topics
        self.reply_topic = self.topics.reply(settings.gateway_id)
        self.functions = functions
        self.workflows = workflows
        self.tokens = tokens
        self.book = book or ResultBook()
        self.limits = auth.RateLimits(settings.token_rate_per_s)
        self.failures = auth.RateLimits(settings.auth_failures_per_s)
        self.callers: OrderedDict[str, str] = OrderedDict()
        """Invocation id -> the token that made it, so its caller may poll a pending result."""
        self.deliveries: set[str] = set()
        """Delivery ids of the pushes already published (the app fills it from the topic too)."""
        self._delivery_lock = asyncio.Lock()
        self._publish = publish

    # ----- who asks ---------------------------------------------------------------------------

    async def authenticate(
        self, header: str | None, path: str, method: str, client: str, query: set[str] | frozenset[str]
    ) -> auth.Principal | None:
        """Who asks (``None``: a public function's anonymous caller), or :class:`auth.AuthError`."""
        if query & QUERY_TOKENS:
            raise auth.AuthError(401, "tokens go in the Authorization header, never in the URL")
        if header is None and path.startswith(INVOKE_PREFIXES) and method == "POST":
            spec = self.functions.get(path.rsplit("/", 1)[-1])
            if spec is not None and spec.public:
                return None
        token = auth.bearer(header)
        try:
            return auth.verify(token, self.tokens.get, now_ms())
        except auth.AuthError as exc:
            if exc.message != "unknown token":
                raise
        # A guess, or a token made a moment ago: guesses from one address are slowed down (429), and the
        # token table is looked at again once it caught up.
        self.failures.take(client)
        await self.tokens.wait_caught_up(timeout_s=1.0)
        return auth.verify(token, self.tokens.get, now_ms())

    def admit(self, principal: auth.Principal, path: str, method: str) -> None:
        """Rate-limit a known caller and refuse reads to a token without the read scope."""
        self.limits.take(principal.id, principal.rate_per_s)
        if method in ("GET", "HEAD") and not principal.can_read() and not path.startswith("/invocations/"):
            raise auth.AuthError(403, "reading needs the read scope")

    # ----- functions and invocations ------------------------------------------------------------

    async def known_function(self, name: str) -> FunctionSpec:
        """The spec of ``name``, read again once caught up if it is not known yet; else 404."""
        spec = self.functions.get(name)
        if spec is None and await self.functions.wait_caught_up(timeout_s=1.0):
            spec = self.functions.get(name)
        if spec is None:
            raise HttpError(404, f"no function named {name!r}")
        return spec

    async def time_budget(self, name: str) -> float:
        """How long a call of ``name`` may take: a function's timeout, or a workflow's steps' together."""
        flow = self.workflows.get(name)
        if flow is None and self.functions.get(name) is None:
            await self.workflows.wait_caught_up(timeout_s=1.0)
            flow = self.workflows.get(name)
        if flow is not None:
            return min(3600.0, sum(s.timeout_s * (s.retries + 1) for s in flow.steps))
        return (await self.known_function(name)).timeout_s

    def may_invoke(self, principal: auth.Principal | None, name: str) -> None:
        """403 unless the caller's token may invoke ``name`` or the function is public."""
        spec = self.functions.get(name)
        public = spec is not None and spec.public
        if principal is not None and not principal.can_invoke(name) and not public:
            raise HttpError(403, f"token {principal.id} may not invoke {name!r}")

    async def new_invocation(
        self, principal: auth.Principal | None, name: str, payload: Any, sync: bool
    ) -> InvocationRequested:
        """The invocation a call becomes (a sync one gets a deadline); its caller is remembered."""
        budget = await self.time_budget(name)
        deadline = now_ms() + int((budget + self.settings.sync_queue_s) * 1000) if sync else None
        inv = InvocationRequested(
            function=name,
            payload=payload,
            reply_to=self.reply_topic,
            deadline_ms=deadline,
            principal=principal.id if principal else None,
        )
        if principal is not None:
            self.callers[inv.id] = principal.id
            while len(self.callers) > MAX_CALLERS:
                self.callers.popitem(last=False)
        return inv

    async def submit(self, inv: InvocationRequested) -> None:
        """Publish an invocation; 503 unless the broker confirmed it in time."""
        try:
            await asyncio.wait_for(
                self._publish(
                    inv,
                    self.topics.invocation,
                    inv.function.encode(),
                    {PRINCIPAL_HEADER: inv.principal} if inv.principal else None,
                ),
                self.settings.publish_timeout_s,
            )
        except Exception as exc:  # noqa: BLE001 - whatever failed, the record is not known to be written
            log.warning("could not publish invocation %s: %r", inv.id, exc)
            raise HttpError(503, "the broker did not confirm the invocation; it was not accepted") from exc

    def read_invocation(self, principal: auth.Principal, invocation_id: str) -> tuple[int, Any]:
        """What ``GET /invocations/ID`` answers this caller: (status, body), or :class:`HttpError`."""
        mine = self.callers.get(invocation_id) == principal.id
        result = self.book.get(invocation_id)
        if result is not None and not (mine or principal.can_read() or principal.can_invoke(result.function)):
            raise HttpError(403, f"token {principal.id} may not read results of {result.function!r}")
        if result is not None:
            return 200, result.model_dump(mode="json")
        if self.book.is_pending(invocation_id) and not (mine or principal.can_read()):
            raise HttpError(403, f"token {principal.id} did not make invocation {invocation_id!r}")
        if self.book.is_pending(invocation_id):
            return 202, {"id": invocation_id, "status": "pending"}
        raise HttpError(404, f"no invocation {invocation_id!r} is known to this gateway")

    # ----- git pushes ---------------------------------------------------------------------------

    async def accept_push(self, push: CodeCommitted) -> bool:
        """Publish a push unless its delivery was published before; whether it was new. 503 on failure."""
        async with self._delivery_lock:  # concurrent redeliveries: one publishes, the others see it
            if push.delivery_id in self.deliveries:
                return False
            try:
                await asyncio.wait_for(
                    self._publish(push, self.topics.code_commit, push.repo.encode(), None),
                    self.settings.publish_timeout_s,
                )
            except Exception as exc:  # noqa: BLE001
                raise HttpError(503, "the broker did not confirm the push; send it again") from exc
            self.deliveries.add(push.delivery_id)
            return True
