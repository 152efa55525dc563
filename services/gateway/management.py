"""The management API (``/api/v1``): functions, builds and their logs, workflows and runs, nodes, invocations.

Every route is a thin shell over :mod:`services.common.operations`, the code the CLI runs for the same
action, so the two cannot drift apart. FastAPI publishes the OpenAPI document at ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from aiokafka.errors import KafkaError
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from events import FunctionSpec, InvocationCompleted, NodeHeartbeat, Taint, Toleration, WorkflowSpec, now_ms
from events.codec import encode_value
from events.function import CodeSource
from services.common import auth, operations
from services.common.artifacts import ArtifactError
from services.common.client import StokerClient, store_archive
from services.common.resultscan import results_since

T = TypeVar("T")
OPERATION_TIMEOUT_S = 30.0
RESULT_LOOKBACK_MS = 60 * 60 * 1000
"""How far back ``GET /api/v1/invocations/ID`` looks for a result (it reads the result topic since then)."""


ZIP_SCHEMA = {"type": "string", "format": "binary"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


def _json(status: int, body: Any) -> Response:
    return Response(encode_value(body), status_code=status, media_type="application/json")


class GitSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(description="Repository URL (file://, ssh:// or https://).")
    branch: str = "main"
    path: str = Field(default="", description="Folder of the function in the repository.")


class FunctionSettings(BaseModel):
    """A function's settings; on update, only those given change."""

    model_config = ConfigDict(extra="forbid")
    entrypoint: str | None = Field(default=None, description="module:function, e.g. handler:main.")
    runtime: Literal["python3.11"] | None = None
    memory_mb: int | None = None
    timeout_s: float | None = None
    concurrency: int | None = None
    reuse: Literal["keep", "reset", "fresh"] | None = None
    reset_max_uses: int | None = None
    cpu_millis: int | None = None
    pids_limit: int | None = None
    max_output_bytes: int | None = None
    env: dict[str, str] | None = None
    network: Literal["none", "egress"] | None = None
    idle_s: float | None = None
    max_invocations: int | None = None
    max_age_s: float | None = None
    node_selector: dict[str, str] | None = None
    tolerations: list[Toleration] | None = None
    prewarm_on_commit: int | None = None
    public: bool | None = Field(default=None, description="Anyone may invoke it, without a token.")


class FunctionCreate(FunctionSettings):
    """A new function: its settings and exactly one of ``git`` or ``archive`` (a base64 zip of its files)."""

    name: str
    entrypoint: str | None = Field(description="module:function, e.g. handler:main.")
    git: GitSource | None = None
    archive: str | None = Field(default=None, description="The function's files as a zip, base64-encoded.")


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scopes: list[str] = Field(description="invoke:GLOB, deploy:GLOB, read or admin.")
    name: str = ""
    expires_in_s: float | None = Field(default=None, gt=0)
    rate_per_s: float | None = Field(default=None, ge=0, description="0: no limit; unset: the gateway's default.")


class Prewarm(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int = Field(default=1, ge=1, le=64)
    reason: str = Field(default="api", max_length=200)


class Isolation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float = Field(default=600.0, gt=0, le=7 * 24 * 3600)
    reason: str = Field(default="api", max_length=200)


class Labels(BaseModel):
    model_config = ConfigDict(extra="forbid")
    set: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)


class Taints(BaseModel):
    model_config = ConfigDict(extra="forbid")
    add: list[Taint] = Field(default_factory=list)
    remove: list[str] = Field(default_factory=list, description="Keys of the taints to remove.")


def management_router(
    client: Callable[[], StokerClient],
    read_body: Callable[[Request], Awaitable[bytes]],
) -> APIRouter:
    """The routes, over the gateway's connected client and its size-limited body reader."""
    api = APIRouter(prefix="/api/v1", tags=["management"])

    def need(request: Request, verb: Literal["deploy", "admin"], name: str = "") -> auth.Principal:
        """The caller, if its token may do ``verb`` (on ``name``); 403 if not. Reads were checked before."""
        principal: auth.Principal | None = getattr(request.state, "principal", None)
        if principal is None:
            raise ApiError(401, "this needs a token: send Authorization: Bearer <token>")
        allowed = principal.admin if verb == "admin" else principal.can_deploy(name)
        if not allowed:
            what = "the admin scope" if verb == "admin" else f"deploy scope on {name!r}"
            raise ApiError(403, f"token {principal.id} has no {what}")
        return principal

    async def run(action: Callable[[StokerClient], Awaitable[T]]) -> T:
        try:
            return await asyncio.wait_for(action(client()), OPERATION_TIMEOUT_S)
        except operations.WorkflowRefused as exc:
            problems = [{"line": line, "reason": reason} for line, reason in exc.errors]
            raise ApiError(exc.status, str(exc), problems=problems) from exc
        except operations.Refused as exc:
            raise ApiError(exc.status, str(exc)) from exc
        except (KafkaError, TimeoutError) as exc:
            raise ApiError(
                503, "the broker did not answer in time; nothing was changed that was not confirmed"
            ) from exc

    def archive_source(blob: bytes) -> CodeSource:
        try:
            return store_archive(client().settings, blob)
        except ArtifactError as exc:
            raise ApiError(400, f"the archive cannot be used: {exc}") from exc

    # ----- functions ------------------------------------------------------------------------------

    @api.get("/functions", summary="List functions")
    async def list_functions() -> Response:
        specs = await run(lambda c: c.functions())
        return _json(200, [s.model_dump(mode="json") for s in sorted(specs.values(), key=lambda s: s.name)])

    @api.get("/functions/{name}", summary="A function's spec")
    async def get_function(name: str) -> Response:
        spec = (await run(lambda c: c.functions())).get(name)
        if spec is None:
            raise ApiError(404, f"no function named {name!r}")
        return _json(200, spec.model_dump(mode="json"))

    @api.post("/functions", status_code=201, summary="Create a function from an archive or a git source")
    async def create_function(body: FunctionCreate, request: Request) -> Response:
        need(request, "deploy", body.name)
        if (body.git is None) == (body.archive is None):
            raise ApiError(400, "give exactly one of git or archive")
        if body.archive is not None:
            try:
                blob = base64.b64decode(body.archive, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ApiError(400, f"archive is not base64: {exc}") from exc
            source = archive_source(blob)
        else:
            assert body.git is not None
            source = CodeSource(
                kind="git", git_url=body.git.url, git_branch=body.git.branch, git_path=body.git.path.strip("/") or None
            )
        fields = body.model_dump(exclude_unset=True, exclude={"git", "archive"})
        try:
            spec = FunctionSpec.model_validate({**fields, "source": source})
        except ValueError as exc:
            raise ApiError(400, f"not a valid function: {exc}") from exc
        await run(lambda c: operations.create_function(c, spec))
        return _json(201, spec.model_dump(mode="json"))

    @api.patch("/functions/{name}", summary="Change a function's settings (a new revision)")
    async def update_function(name: str, body: FunctionSettings, request: Request) -> Response:
        need(request, "deploy", name)
        changes = body.model_dump(exclude_unset=True)
        if not changes:
            raise ApiError(400, "nothing to change")
        spec = await run(lambda c: operations.update_function(c, name, changes))
        return _json(200, spec.model_dump(mode="json"))

    @api.put(
        "/functions/{name}/archive",
        summary="New code for a function: the request body is a zip of its files",
        openapi_extra={
            "requestBody": {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}}}
        },
    )
    async def put_archive(name: str, request: Request) -> Response:
        need(request, "deploy", name)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/zip":
            raise ApiError(415, "send the archive as Content-Type: application/zip")
        source = archive_source(await read_body(request))
        spec = await run(lambda c: operations.update_function(c, name, {"source": source.model_dump()}))
        return _json(200, spec.model_dump(mode="json"))

    @api.delete("/functions/{name}", status_code=204, summary="Delete a function")
    async def delete_function(name: str, request: Request) -> Response:
        need(request, "deploy", name)
        await run(lambda c: operations.delete_function(c, name))
        return Response(status_code=204)

    @api.post("/functions/{name}/prewarm", status_code=202, summary="Load the active version ahead of demand")
    async def prewarm(name: str, body: Prewarm, request: Request) -> Response:
        need(request, "deploy", name)
        await run(lambda c: operations.prewarm(c, name, body.count, reason=body.reason))
        return _json(202, {"function": name, "count": body.count})

    @api.put("/functions/{name}/isolation", status_code=202, summary="Run a function only on isolation nodes")
    async def isolate(name: str, body: Isolation, request: Request) -> Response:
        need(request, "admin")
        await run(lambda c: operations.isolate(c, name, body.seconds, reason=body.reason))
        return _json(202, {"function": name, "isolated_for_s": body.seconds})

    @api.delete("/functions/{name}/isolation", status_code=204, summary="End a function's isolation")
    async def release(name: str, request: Request) -> Response:
        need(request, "admin")
        await run(lambda c: operations.release_isolation(c, name))
        return Response(status_code=204)

    @api.get("/functions/{name}/builds", summary="A function's builds")
    async def builds(name: str) -> Response:
        return _json(200, await run(lambda c: operations.builds(c, name)))

    @api.get("/functions/{name}/builds/{build}/log", summary="A build's log")
    async def build_log(name: str, build: str) -> Response:
        log = await run(lambda c: operations.build_log(c, name, build))
        return Response(log, media_type="text/plain; charset=utf-8")

    @api.get("/functions/{name}/logs", summary="What the function printed in its last invocations")
    async def function_logs(name: str, last: int = 20) -> Response:
        if not 1 <= last <= 1000:
            raise ApiError(400, "last is from 1 to 1000")
        results = await run(lambda c: operations.recent_results(c, name, last))
        keep = {"id", "status", "node", "instance", "completed_ms", "logs"}
        return _json(200, [r.model_dump(mode="json", include=keep) for r in results])

    # ----- workflows ------------------------------------------------------------------------------

    async def definition(request: Request) -> str:
        raw = await read_body(request)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ApiError(400, "the definition is not UTF-8 text") from exc

    yaml_body = {"requestBody": {"content": {"application/yaml": {"schema": {"type": "string"}}}}}

    @api.get("/workflows", summary="List workflows")
    async def list_workflows() -> Response:
        rows = await run(lambda c: c.table(c.topics.workflow, WorkflowSpec))
        return _json(200, [rows[n].model_dump(mode="json") for n in sorted(rows)])

    @api.get("/workflows/{name}", summary="A workflow's definition")
    async def get_workflow(name: str) -> Response:
        spec = (await run(lambda c: c.table(c.topics.workflow, WorkflowSpec))).get(name)
        if spec is None:
            raise ApiError(404, f"no workflow named {name!r}")
        return _json(200, spec.model_dump(mode="json"))

    @api.post("/workflows/{name}", status_code=201, summary="Create a workflow from YAML", openapi_extra=yaml_body)
    async def create_workflow(name: str, request: Request) -> Response:
        need(request, "deploy", name)
        text = await definition(request)
        spec = await run(lambda c: operations.put_workflow(c, name, text, replace=False))
        return _json(201, spec.model_dump(mode="json"))

    @api.put("/workflows/{name}", summary="Replace a workflow's definition", openapi_extra=yaml_body)
    async def replace_workflow(name: str, request: Request) -> Response:
        need(request, "deploy", name)
        text = await definition(request)
        spec = await run(lambda c: operations.put_workflow(c, name, text, replace=True))
        return _json(200, spec.model_dump(mode="json"))

    @api.delete("/workflows/{name}", status_code=204, summary="Delete a workflow")
    async def delete_workflow(name: str, request: Request) -> Response:
        need(request, "deploy", name)
        await run(lambda c: operations.delete_workflow(c, name))
        return Response(status_code=204)

    @api.get("/workflows/{name}/runs", summary="A workflow's last runs")
    async def runs(name: str, last: int = 20) -> Response:
        return _json(200, await run(lambda c: operations.runs_of(c, name, last)))

    @api.get("/runs/{run_id}", summary="Every step of one run")
    async def run_status(run_id: str) -> Response:
        return _json(200, await run(lambda c: operations.run_status(c, run_id)))

    # ----- nodes ----------------------------------------------------------------------------------

    @api.get("/nodes", summary="Nodes with their labels, taints, cordon state and instances")
    async def nodes() -> Response:
        rows = await run(lambda c: c.nodes())
        now = now_ms()
        shown = []
        for name, rec in sorted(rows.items()):
            if isinstance(rec, NodeHeartbeat):
                shown.append({**rec.model_dump(mode="json", exclude={"version"}), "up": rec.fresh(now)})
            elif rec.type == "node.stopped":
                shown.append({"node": name, "up": False, "stopped": True})
        return _json(200, shown)

    @api.post("/nodes/{name}/labels", status_code=202, summary="Set or remove labels")
    async def labels(name: str, body: Labels, request: Request) -> Response:
        need(request, "admin")
        changes: dict[str, str | None] = {**body.set, **{key: None for key in body.remove}}
        await run(lambda c: operations.configure_node(c, name, labels=changes))
        return _json(202, {"node": name})

    @api.post("/nodes/{name}/taints", status_code=202, summary="Add or remove taints")
    async def taints(name: str, body: Taints, request: Request) -> Response:
        need(request, "admin")
        await run(lambda c: operations.configure_node(c, name, add_taints=body.add, remove_taints=body.remove))
        return _json(202, {"node": name})

    @api.post("/nodes/{name}/{action}", status_code=202, summary="cordon, uncordon or drain a node")
    async def node_action(name: str, action: Literal["cordon", "uncordon", "drain"], request: Request) -> Response:
        need(request, "admin")
        changes = {"cordon": {"unschedulable": True}, "uncordon": {"unschedulable": False}, "drain": {"drain": True}}
        await run(lambda c: operations.configure_node(c, name, **changes[action]))
        return _json(202, {"node": name, "action": action})

    # ----- invocations ----------------------------------------------------------------------------

    @api.get("/invocations/{invocation_id}", summary="An invocation's result (any gateway's, or a Kafka client's)")
    async def invocation(invocation_id: str) -> Response:
        async def find(c: StokerClient) -> list[InvocationCompleted]:
            _, found = await results_since(
                c.settings.bootstrap, c.topics.result, now_ms() - RESULT_LOOKBACK_MS, lambda i: i == invocation_id
            )
            return found

        found = await run(find)
        if not found:
            raise ApiError(404, f"no result of {invocation_id!r} in the last hour")
        return _json(200, found[-1].model_dump(mode="json"))

    # ----- tokens ---------------------------------------------------------------------------------

    @api.get("/tokens", summary="Tokens (never their secrets or hashes)")
    async def list_tokens(request: Request) -> Response:
        need(request, "admin")
        rows = await run(operations.tokens)
        return _json(200, [operations.token_row(rows[k]) for k in sorted(rows)])

    @api.post("/tokens", status_code=201, summary="A new token; its secret is in this answer only")
    async def create_token(body: TokenCreate, request: Request) -> Response:
        principal = need(request, "admin")
        token, record = await run(
            lambda c: operations.create_token(
                c,
                body.scopes,
                name=body.name,
                expires_in_s=body.expires_in_s,
                rate_per_s=body.rate_per_s,
                by=principal.id,
            )
        )
        return _json(201, {"token": token, **operations.token_row(record)})

    @api.delete("/tokens/{ident}", status_code=204, summary="Revoke a token")
    async def revoke_token(ident: str, request: Request) -> Response:
        principal = need(request, "admin")
        await run(lambda c: operations.revoke_token(c, ident, by=principal.id))
        return Response(status_code=204)

    return api
