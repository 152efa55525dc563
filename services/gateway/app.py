"""The HTTP gateway: invocations and the function API over HTTP, turned into Kafka records.

A request is answered 2xx only after the broker confirmed the write; a broker that cannot be
reached gives 503. Synchronous calls wait on this gateway's own reply topic.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from events import (
    AuditRecorded,
    CodeCommitted,
    FunctionSpec,
    InvocationCompleted,
    InvocationRequested,
    RepoConfigured,
    TokenIssued,
    TokenRevoked,
    WorkflowSpec,
    now_ms,
)
from events.base import Record
from events.codec import DecodeError, encode_value, loads
from services.common import auth, telemetry
from services.common.admin import ensure_topics
from services.common.broker import make_broker
from services.common.client import StokerClient
from services.common.repos import same_repo
from services.common.runner import clear_ready, configure_logging, mark_ready, serve_http
from services.common.telemetry import setup_tracing
from services.common.views import Reader, Table, dead_letters_to
from services.gateway import webhooks
from services.gateway.core import Gateway, HttpError
from services.gateway.management import ApiError, management_router
from services.gateway.settings import GatewaySettings

log = logging.getLogger("stoker.gateway")

REQUESTS = Counter("stoker_gateway_requests_total", "HTTP requests", ["route", "status"])
LATENCY = Histogram(
    "stoker_gateway_request_seconds",
    "HTTP request latency",
    ["route"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
)

WEBHOOK_REJECTIONS = Counter("stoker_webhook_rejections_total", "Refused webhook deliveries", ["reason"])
WEBHOOK_DELIVERIES = Counter("stoker_webhook_deliveries_total", "Webhook deliveries", ["host", "outcome"])

OPEN_PATHS = frozenset({"/healthz", "/webhooks/git", "/console"})
"""Routes without a token: liveness, git webhooks (their own HMAC secrets), the redirect to the console
(which has its own login)."""

STATUS_HTTP = {"ok": 200, "error": 500, "timeout": 504, "lost": 502}


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(encode_value(body), status_code=status, media_type="application/json", headers=headers)


def result_response(result: InvocationCompleted) -> Response:
    """The HTTP answer for a terminal result: the output itself on success."""
    t = result.timings_ms
    headers = {
        "X-Stoker-Invocation-Id": result.id,
        "X-Stoker-Status": result.status,
        "Server-Timing": f"queue;dur={t.queue}, start;dur={t.start}, exec;dur={t.exec}, total;dur={t.total}",
    }
    if result.start:
        headers["X-Stoker-Start"] = result.start
    if result.node:
        headers["X-Stoker-Node"] = result.node
    if result.status == "ok":
        return _json(200, result.output, headers)
    if result.status == "rejected":
        kind = result.error.kind if result.error else ""
        status = 404 if kind == "unknown_function" else 429
    else:
        status = STATUS_HTTP[result.status]
    return _json(status, result.model_dump(mode="json", exclude={"output"}), headers)


def create_app(settings: GatewaySettings) -> FastAPI:
    common = settings.common
    topics = common.topics
    provider = setup_tracing("gateway", common)
    broker = make_broker(common, "gateway", provider)
    reader = Reader(common.bootstrap, "gateway", dead_letters=dead_letters_to(broker, topics.dlq))
    functions = reader.table(topics.function, (FunctionSpec,))
    repos = reader.table(topics.repo, (RepoConfigured,))
    workflows = reader.table(topics.workflow, (WorkflowSpec,))
    tokens: Table[TokenIssued | TokenRevoked] = reader.table(topics.token, (TokenIssued, TokenRevoked))

    async def publish(record: Record, topic: str, key: bytes | None, headers: dict[str, str] | None) -> Any:
        return await broker.publish(record, topic, key=key, headers=headers)

    gateway = Gateway(settings, publish, functions, workflows, tokens)
    book = gateway.book
    reader.tail(gateway.reply_topic, (InvocationCompleted,), book.resolve)
    # The management API's writes and reads (services.common.operations, as the CLI's); its producer
    # is made on the server's loop.
    clients: list[StokerClient] = []
    # Delivery ids already published, read back from the topic itself: a redelivery after a
    # gateway restart is recognised too.
    reader.tail(
        topics.code_commit, (CodeCommitted,), lambda event: gateway.deliveries.add(event.delivery_id), replay=True
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await ensure_topics(common.bootstrap, [topics.reply_spec(settings.gateway_id)])
        await reader.start()
        await broker.start()
        clients.append(await StokerClient(common).__aenter__())
        mark_ready(common, "gateway", url=f"http://{settings.host}:{settings.port}")
        try:
            yield
        finally:
            clear_ready(common, "gateway")
            for client in clients:
                await client.__aexit__(None, None, None)
            await broker.stop()
            await reader.stop()
            provider.shutdown()

    app = FastAPI(title="Stoker gateway", lifespan=lifespan)

    @app.exception_handler(HttpError)
    async def http_error(_: Request, exc: HttpError) -> Response:
        return _json(exc.status, {"error": exc.message, **exc.extra})

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        return _json(exc.status, {"error": exc.message, **exc.extra})

    async def audit(request: Request, status: int) -> None:
        """Record a management action on the audit topic (after it ran, with how it went)."""
        principal: auth.Principal | None = getattr(request.state, "principal", None)
        record = AuditRecorded(
            principal=principal.label() if principal else "public",
            method=request.method,
            path=request.url.path,
            status=status,
        )
        log.info("audit: %s %s %s -> %d", record.principal, record.method, record.path, status)
        try:
            key = principal.id.encode() if principal else None
            await asyncio.wait_for(broker.publish(record, topics.audit, key=key), settings.publish_timeout_s)
        except Exception as exc:  # noqa: BLE001 - the action ran; say loudly that its record is missing
            log.error(
                "could not record %s %s by %s on the audit topic: %r", record.method, record.path, record.principal, exc
            )

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        if request.url.path not in OPEN_PATHS:
            try:
                principal = await gateway.authenticate(
                    request.headers.get("authorization"),
                    request.url.path,
                    request.method,
                    request.client.host if request.client else "?",
                    set(request.query_params.keys()),
                )
                if principal is not None:
                    gateway.admit(principal, request.url.path, request.method)
            except auth.AuthError as exc:
                REQUESTS.labels("auth", str(exc.status)).inc()
                headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
                if exc.retry_after_s is not None:
                    headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
                return _json(exc.status, {"error": exc.message}, headers)
            request.state.principal = principal
        response: Response = await call_next(request)
        if request.method not in ("GET", "HEAD") and request.url.path.startswith("/api/v1/"):
            await audit(request, response.status_code)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        REQUESTS.labels(path, str(response.status_code)).inc()
        LATENCY.labels(path).observe(time.perf_counter() - started)
        return response

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise HttpError(413, f"body of {declared} bytes is over the limit of {settings.max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise HttpError(413, f"body is over the limit of {settings.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_payload(request: Request) -> Any:
        body = await read_body(request)
        if not body.strip():
            return None
        try:
            return loads(body)
        except DecodeError as exc:
            raise HttpError(400, f"the body is not valid JSON: {exc.reason}") from exc

    async def accept(request: Request, name: str, sync: bool) -> InvocationRequested:
        principal: auth.Principal | None = request.state.principal
        gateway.may_invoke(principal, name)
        payload = await read_payload(request)
        inv = await gateway.new_invocation(principal, name, payload, sync)
        # FastAPI opens the server span of the request; it gets the ids that `stoker trace` looks up.
        span = trace.get_current_span()
        span.set_attribute(telemetry.INVOCATION_ID, inv.id)
        span.set_attribute(telemetry.FUNCTION, name)
        span.set_attribute(telemetry.PRINCIPAL, principal.label() if principal else "public")
        return inv

    @app.post("/fn/{name}")
    async def invoke_sync(name: str, request: Request) -> Response:
        inv = await accept(request, name, sync=True)
        waiter = book.expect(inv.id)
        try:
            await gateway.submit(inv)
            assert inv.deadline_ms is not None
            wait_s = (inv.deadline_ms - now_ms()) / 1000 + 5.0
            result = await asyncio.wait_for(waiter, timeout=wait_s)
        except TimeoutError:
            book.accepted(inv.id)
            raise HttpError(504, "no result in time; poll /invocations/ID", id=inv.id) from None
        finally:
            book.forget(inv.id)
        return result_response(result)

    @app.post("/async/fn/{name}")
    async def invoke_async(name: str, request: Request) -> Response:
        inv = await accept(request, name, sync=False)
        book.accepted(inv.id)
        await gateway.submit(inv)
        return _json(202, {"id": inv.id, "status": "accepted"}, {"Location": f"/invocations/{inv.id}"})

    @app.get("/invocations/{invocation_id}")
    async def get_invocation(invocation_id: str, request: Request) -> Response:
        principal: auth.Principal | None = request.state.principal
        assert principal is not None  # reading a result always needs a token
        status, body = gateway.read_invocation(principal, invocation_id)
        return _json(status, body)

    @app.get("/functions")
    async def list_functions() -> Response:
        await functions.wait_caught_up(timeout_s=1.0)
        return _json(
            200, [spec.model_dump(mode="json") for spec in sorted(functions.rows.values(), key=lambda s: s.name)]
        )

    @app.get("/functions/{name}")
    async def get_function(name: str) -> Response:
        return _json(200, (await gateway.known_function(name)).model_dump(mode="json"))

    def secret_for(names: list[str]) -> str | None:
        for config in repos.rows.values():
            if same_repo(config.repo, names):
                return config.webhook_secret
        return settings.webhook_secret or None

    @app.post("/webhooks/git")
    async def git_webhook(request: Request) -> Response:
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            raise HttpError(413, f"body is over the limit of {settings.max_body_bytes} bytes")
        headers = {k.lower(): v for k, v in request.headers.items()}
        host = webhooks.host_of(headers)
        try:
            try:
                body = loads(raw)
            except DecodeError as exc:
                raise webhooks.WebhookRejected(400, "malformed", f"the body is not valid JSON: {exc.reason}") from exc
            delivery = webhooks.parse(host, headers, body, hashlib.sha256(raw).hexdigest()[:32])
            await repos.wait_caught_up(timeout_s=1.0)
            webhooks.authenticate(delivery, headers, raw, secret_for)
        except webhooks.WebhookRejected as exc:
            WEBHOOK_REJECTIONS.labels(exc.reason).inc()
            raise HttpError(exc.status, exc.message) from exc
        if delivery.kind == "ignored":
            WEBHOOK_DELIVERIES.labels(host, "ignored").inc()
            return _json(202, {"status": "ignored", "delivery": delivery.delivery_id})
        if delivery.kind == "ping":
            WEBHOOK_DELIVERIES.labels(host, "ping").inc()
            return _json(200, {"status": "pong", "delivery": delivery.delivery_id})
        push = delivery.push
        assert push is not None
        trace.get_current_span().set_attribute("stoker.delivery.id", push.delivery_id)
        if not await gateway.accept_push(push):
            WEBHOOK_DELIVERIES.labels(host, "duplicate").inc()
            return _json(200, {"status": "duplicate", "delivery": push.delivery_id})
        WEBHOOK_DELIVERIES.labels(host, "accepted").inc()
        return _json(202, {"status": "accepted", "delivery": push.delivery_id, "repo": push.repo, "ref": push.ref})

    app.include_router(management_router(lambda: clients[0], read_body))

    @app.get("/console")
    async def console() -> Response:
        # The console is a service of its own, so that its reading of every topic never shares a
        # process with the invocation path.
        return Response(status_code=307, headers={"Location": settings.console_url})

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json(200, {"status": "ok", "gateway": settings.gateway_id})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def main() -> None:
    settings = GatewaySettings.from_env()
    configure_logging(settings.common)
    serve_http(create_app(settings), settings.host, settings.port, graceful_s=5)
