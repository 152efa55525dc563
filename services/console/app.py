"""The web console: pages, their JSON, a server-sent event stream, and the actions a console offers.

Composition only: the :class:`Console` core reads the topics, :mod:`services.console.state` computes
what is shown, :mod:`services.common.operations` does what the CLI does for the same actions.
"""

from __future__ import annotations

import asyncio
import html
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiokafka.errors import KafkaError
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse

from events.code import BuildFinished
from events.codec import DecodeError, encode_value, loads
from services.cli.broker import platform_broker_is_reachable
from services.common import auth, operations
from services.common.artifacts import ArtifactError, LocalArtifactStore
from services.common.runner import clear_ready, configure_logging, mark_ready, serve_http
from services.common.telemetry import setup_tracing
from services.console.core import Console
from services.console.settings import ConsoleSettings

log = logging.getLogger("stoker.console")

WEB = Path(__file__).parent / "web"
VENDOR = {
    # Served as their packages publish them (npm ci in services/console/web, run by `make setup`).
    "chart.js": WEB / "node_modules" / "chart.js" / "dist" / "chart.umd.min.js",
    "cytoscape.js": WEB / "node_modules" / "cytoscape" / "dist" / "cytoscape.min.js",
}
PAGES = {
    "cluster": "Cluster",
    "functions": "Functions",
    "invocations": "Invocations",
    "workflows": "Workflows",
}
TITLES = {**PAGES, "login": "Log in", "invocation": "Invocation", "run": "Workflow run"}
COOKIE = "stoker_console"
OPEN_PREFIXES = ("/console/login", "/console/api/login", "/console/static/", "/console/vendor/", "/healthz")
"""What a browser may fetch before it logged in: the login page and what it is drawn with."""
ACTION_TIMEOUT_S = 10.0
MAX_BODY_BYTES = 1024 * 1024


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _json(status: int, body: Any) -> Response:
    return Response(encode_value(body), status_code=status, media_type="application/json")


def missing_assets() -> list[str]:
    return [str(path) for path in VENDOR.values() if not path.is_file()]


def page(kind: str, arg: str = "") -> HTMLResponse:
    """The shell of one page; ``console.js`` fills it from the API and the event stream."""
    nav = "".join(
        f'<a href="/console{"" if k == "cluster" else "/" + k}" class="{"on" if k == kind else ""}">{t}</a>'
        for k, t in PAGES.items()
    )
    title = TITLES.get(kind, kind.capitalize())
    return HTMLResponse(
        f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Stoker · {html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/console/static/console.css">
<script src="/console/vendor/chart.js" defer></script>
<script src="/console/vendor/cytoscape.js" defer></script>
<script src="/console/static/console.js" defer></script>
</head><body>
<header><b>Stoker</b><nav>{nav}</nav><span id="broker" class="broker">connecting…</span></header>
<main id="app" data-page="{html.escape(kind)}" data-arg="{html.escape(arg)}"></main>
</body></html>"""
    )


def create_app(settings: ConsoleSettings) -> FastAPI:
    common = settings.common
    provider = setup_tracing("console", common)
    console = Console(settings, lambda: platform_broker_is_reachable(common.bootstrap))
    guesses = auth.RateLimits(settings.login_failures_per_s)
    """Well-formed tokens that match nothing, per client address: guessing is slowed down (429)."""

    async def who(request: Request, token: str) -> auth.Principal:
        try:
            return await asyncio.wait_for(console.principal(token), ACTION_TIMEOUT_S)
        except auth.AuthError as exc:
            if exc.message == "unknown token":
                guesses.take(request.client.host if request.client else "?")
            raise

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        missing = missing_assets()
        if missing:
            log.error("console: browser libraries missing (%s); run `make setup`", ", ".join(missing))
        mark_ready(common, "console", url=f"http://{settings.host}:{settings.port}/console")
        try:
            yield
        finally:
            clear_ready(common, "console")
            await console.stop()
            provider.shutdown()

    app = FastAPI(title="Stoker console", lifespan=lifespan)
    app.state.console = console

    @app.exception_handler(HttpError)
    async def http_error(_: Request, exc: HttpError) -> Response:
        return _json(exc.status, {"error": exc.message})

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Response:
        """Every page and API call needs a token with the read scope: the login's cookie, or a Bearer header."""
        path = request.url.path
        if path.startswith(OPEN_PREFIXES):
            return await call_next(request)
        is_page = not path.startswith("/console/api/")
        if request.query_params.keys() & {"token", "access_token"}:
            return _json(401, {"error": "tokens go in the Authorization header or the login's cookie, never the URL"})
        header = request.headers.get("authorization")
        try:
            token = auth.bearer(header) if header is not None else request.cookies.get(COOKIE)
            if not token:
                raise auth.AuthError(401, "log in with a token first")
            principal = await who(request, token)
            if not principal.can_read():
                raise auth.AuthError(403, f"token {principal.id} has no read scope, which the console needs")
        except auth.AuthError as exc:
            if is_page and exc.status == 401:
                return RedirectResponse(f"/console/login?next={quote(path)}", status_code=303)
            return _json(exc.status, {"error": exc.message})
        except (KafkaError, OSError, TimeoutError) as exc:
            return _json(503, {"error": f"the broker cannot be read: {exc!r}"})
        request.state.principal = principal
        return await call_next(request)

    def allowed(request: Request, ok: bool, what: str) -> None:
        principal: auth.Principal = request.state.principal
        if not ok:
            raise HttpError(403, f"token {principal.id} may not {what}")
        log.info("audit: %s console %s", principal.label(), what)

    async def watching() -> Console:
        try:
            await asyncio.wait_for(console.ensure_watching(), ACTION_TIMEOUT_S * 3)
        except (KafkaError, OSError, TimeoutError) as exc:
            raise HttpError(503, f"the broker cannot be read: {exc!r}") from exc
        return console

    async def act(action: Any) -> None:
        client = (await watching()).client
        assert client is not None
        try:
            await asyncio.wait_for(action(client), ACTION_TIMEOUT_S)
        except operations.Refused as exc:
            raise HttpError(exc.status, str(exc)) from exc
        except (KafkaError, TimeoutError) as exc:
            raise HttpError(503, "the broker did not confirm the action; it was not done") from exc

    async def body_of(request: Request) -> Any:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise HttpError(413, f"body is over the limit of {MAX_BODY_BYTES} bytes")
        if not raw.strip():
            return None
        try:
            return loads(raw)
        except DecodeError as exc:
            raise HttpError(400, f"the body is not valid JSON: {exc.reason}") from exc

    # ----- pages ----------------------------------------------------------------------------------

    @app.get("/console/login")
    async def login_page() -> HTMLResponse:
        return page("login")

    @app.post("/console/api/login")
    async def login(request: Request) -> Response:
        body = await body_of(request)
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token.strip():
            raise HttpError(400, 'send {"token": "stk_..."}')
        await watching()
        try:
            principal = await who(request, token.strip())
        except auth.AuthError as exc:
            raise HttpError(exc.status, exc.message) from exc
        if not principal.can_read():
            raise HttpError(403, f"token {principal.id} has no read scope, which the console needs")
        answer = _json(200, {"id": principal.id, "name": principal.name, "scopes": list(principal.scopes)})
        answer.set_cookie(COOKIE, token.strip(), httponly=True, samesite="strict", path="/console")
        return answer

    @app.post("/console/api/logout")
    async def logout() -> Response:
        answer = _json(200, {"logged_out": True})
        answer.delete_cookie(COOKIE, path="/console")
        return answer

    @app.get("/console/api/me")
    async def me(request: Request) -> Response:
        principal: auth.Principal = request.state.principal
        return _json(200, {"id": principal.id, "name": principal.name, "scopes": list(principal.scopes)})

    @app.get("/console")
    async def cluster_page() -> HTMLResponse:
        return page("cluster")

    @app.get("/console/functions")
    async def functions_page() -> HTMLResponse:
        return page("functions")

    @app.get("/console/invocations")
    async def invocations_page() -> HTMLResponse:
        return page("invocations")

    @app.get("/console/invocations/{ident}")
    async def invocation_page(ident: str) -> HTMLResponse:
        return page("invocation", ident)

    @app.get("/console/workflows")
    async def workflows_page() -> HTMLResponse:
        return page("workflows")

    @app.get("/console/runs/{run_id}")
    async def run_page(run_id: str) -> HTMLResponse:
        return page("run", run_id)

    @app.get("/console/static/{name}")
    async def static(name: str) -> FileResponse:
        path = WEB / "static" / name
        if "/" in name or not path.is_file():
            raise HttpError(404, f"no file {name!r}")
        return FileResponse(path)

    @app.get("/console/vendor/{name}")
    async def vendor(name: str) -> FileResponse:
        path = VENDOR.get(name)
        if path is None:
            raise HttpError(404, f"no library {name!r}")
        if not path.is_file():
            raise HttpError(500, f"{path} is missing: run `make setup` (npm ci in services/console/web)")
        return FileResponse(path, media_type="text/javascript")

    # ----- what the pages read ----------------------------------------------------------------------

    @app.get("/console/api/cluster")
    async def cluster() -> Response:
        return _json(200, (await watching()).cluster())

    @app.get("/console/api/functions")
    async def functions() -> Response:
        return _json(200, (await watching()).functions())

    @app.get("/console/api/invocations")
    async def invocations(
        function: str | None = None, status: str | None = None, start: str | None = None, limit: int = 200
    ) -> Response:
        shown = (await watching()).results.recent(
            function=function, status=status, start=start, limit=max(1, min(limit, 2000))
        )
        return _json(200, shown)

    @app.get("/console/api/invocations/{ident}")
    async def invocation(ident: str) -> Response:
        found = (await watching()).invocation(ident)
        if found is None:
            raise HttpError(404, f"no invocation {ident!r} in the console's last results or traces")
        return _json(200, found)

    @app.get("/console/api/workflows")
    async def workflows() -> Response:
        return _json(200, (await watching()).workflows())

    @app.get("/console/api/runs/{run_id}")
    async def run(run_id: str) -> Response:
        view = (await watching()).runs.view(run_id)
        if view is None:
            raise HttpError(404, f"no workflow run {run_id!r} is known to the console")
        return _json(200, view)

    @app.get("/console/api/functions/{name}/builds/{build}/log")
    async def build_log(name: str, build: str) -> Response:
        records = (await watching()).builds.get(name, [])
        uri = next((r.log_uri for r in records if isinstance(r, BuildFinished) and r.build_id == build), None)
        if uri is None:
            raise HttpError(404, f"no finished build {build!r} of {name!r} with a log")
        try:
            text = LocalArtifactStore(common.artifacts_dir).get(uri).decode(errors="replace")
        except ArtifactError as exc:
            raise HttpError(404, str(exc)) from exc
        return Response(text, media_type="text/plain; charset=utf-8")

    @app.get("/console/api/stream")
    async def stream(request: Request) -> StreamingResponse:
        await watching()

        async def events() -> AsyncIterator[bytes]:
            async with console.subscribe() as queue:
                yield b"retry: 1000\n\n"
                while not await request.is_disconnected():
                    try:
                        event, data = await asyncio.wait_for(queue.get(), 15.0)
                    except TimeoutError:
                        yield b": keep-alive\n\n"  # proxies close silent connections
                        continue
                    yield b"event: " + event.encode() + b"\ndata: " + encode_value(data) + b"\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    # ----- actions (the CLI's, through services.common.operations) ---------------------------------

    @app.post("/console/api/functions/{name}/invoke")
    async def invoke(name: str, request: Request) -> Response:
        allowed(request, request.state.principal.can_invoke(name), f"invoke {name!r}")
        payload = await body_of(request)
        client = (await watching()).client
        assert client is not None
        if name not in await client.functions():
            raise HttpError(404, f"no function named {name!r}")
        try:
            result = await client.invoke(name, payload, timeout_s=60.0)
        except TimeoutError as exc:
            raise HttpError(504, "no result within 60 s") from exc
        except KafkaError as exc:
            raise HttpError(503, "the broker did not confirm the invocation; it was not accepted") from exc
        return _json(200, result.model_dump(mode="json"))

    @app.post("/console/api/functions/{name}/prewarm")
    async def prewarm(name: str, request: Request) -> Response:
        body = await body_of(request) or {}
        count = body.get("count", 1) if isinstance(body, dict) else None
        if not isinstance(count, int) or not 1 <= count <= 64:
            raise HttpError(400, "count is a whole number from 1 to 64")
        allowed(request, request.state.principal.can_deploy(name), f"prewarm {name!r}")
        await act(lambda c: operations.prewarm(c, name, count, reason="console"))
        return _json(202, {"function": name, "prewarm": count})

    @app.post("/console/api/functions/{name}/release")
    async def release(name: str, request: Request) -> Response:
        allowed(request, request.state.principal.admin, f"release {name!r} (admin)")
        await act(lambda c: operations.release_isolation(c, name))
        return _json(202, {"function": name, "released": True})

    @app.post("/console/api/nodes/{name}/{action}")
    async def node_action(name: str, action: str, request: Request) -> Response:
        changes = {"cordon": {"unschedulable": True}, "uncordon": {"unschedulable": False}}.get(action)
        if changes is None:
            raise HttpError(404, f"no node action {action!r} (cordon, uncordon)")
        allowed(request, request.state.principal.admin, f"{action} {name} (admin)")
        await act(lambda c: operations.configure_node(c, name, **changes))
        return _json(202, {"node": name, "action": action})

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json(
            200,
            {
                "status": "ok",
                "watching": console.watching,
                "pages_open": console.pages_open,
                "assets_missing": missing_assets(),
            },
        )

    return app


def main() -> None:
    settings = ConsoleSettings.from_env()
    configure_logging(settings.common)
    serve_http(create_app(settings), settings.host, settings.port, graceful_s=3)
