"""The management actions that the CLI and the console share, over one connected :class:`StokerClient`.

Each checks what it acts on first and raises :class:`Refused` with a message a user can act on; the
CLI prints it, the console answers it as a 4xx.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import ValidationError

from events import (
    BuildFinished,
    BuildStarted,
    CodeCommitted,
    ConfigureNode,
    FunctionSpec,
    InvocationCompleted,
    PlacementOverride,
    PrewarmRequested,
    Record,
    RunFinished,
    RunStarted,
    StepFinished,
    StepStarted,
    TokenIssued,
    TokenRevoked,
    WorkflowSpec,
    now_ms,
)
from services.common import auth
from services.common.artifacts import ArtifactError, LocalArtifactStore
from services.common.client import StokerClient
from services.common.names import NameTaken


class Refused(Exception):
    """The action names something that is not there (``status`` is the HTTP status that says so)."""

    def __init__(self, message: str, status: int = 404) -> None:
        super().__init__(message)
        self.status = status


async def _known_function(client: StokerClient, name: str) -> None:
    if name not in await client.functions():
        raise Refused(f"no function named {name!r}")


async def prewarm(client: StokerClient, name: str, count: int, reason: str) -> None:
    """Ask for ``count`` instances holding the function's active version ahead of demand."""
    await _known_function(client, name)
    await client.send(PrewarmRequested(function=name, count=count, reason=reason), client.topics.prewarm, name)


async def configure_node(client: StokerClient, name: str, **changes: Any) -> None:
    """Change a running node (labels, taints, cordon, drain) through its work topic, as its agent expects."""
    record = (await client.nodes()).get(name)
    if record is None or record.type != "node.heartbeat":
        raise Refused(f"no running node named {name!r}")
    await client.send(ConfigureNode(incarnation=record.incarnation, **changes), client.topics.work(name), name)


async def isolate(client: StokerClient, name: str, seconds: float, reason: str) -> None:
    """Run a function only on isolation nodes for ``seconds``."""
    await _known_function(client, name)
    until = int(time.time() * 1000 + seconds * 1000)
    override = PlacementOverride(function=name, until_ms=until, reason=reason, by="user")
    await client.send(override, client.topics.placement, name)


async def release_isolation(client: StokerClient, name: str) -> None:
    """End a function's isolation now (a tombstone of its placement override)."""
    await _known_function(client, name)
    await client.tombstone(client.topics.placement, name)


# ----- functions ----------------------------------------------------------------------------------


async def create_function(client: StokerClient, spec: FunctionSpec) -> None:
    """Create a function; a git function's branch head is built at once (for this function only)."""
    if spec.name in await client.functions():
        raise Refused(f"function {spec.name!r} exists; update it (PATCH, or `stoker fn update`)", status=409)
    try:
        await client.put_function(spec)
    except NameTaken as exc:
        raise Refused(str(exc), status=409) from exc
    if spec.source.kind == "git":
        first = CodeCommitted(
            repo=spec.source.git_url or "",
            ref=f"refs/heads/{spec.source.git_branch or 'main'}",
            delivery_id=f"api:{uuid.uuid4().hex}",
            source="cli",
            only_functions=[spec.name],
        )
        await client.send(first, client.topics.code_commit, first.repo)


async def update_function(client: StokerClient, name: str, changes: dict[str, Any]) -> FunctionSpec:
    """A new revision of a function with ``changes`` (spec fields) applied; 400 if they do not validate."""
    spec = (await client.functions()).get(name)
    if spec is None:
        raise Refused(f"no function named {name!r}")
    stamped = {"revision": spec.revision + 1, "updated_ms": now_ms(), "name": name}
    try:
        new = FunctionSpec.model_validate({**spec.model_dump(), **changes, **stamped})
    except ValidationError as exc:
        raise Refused(f"the changes do not make a valid function: {exc}", status=400) from exc
    try:
        await client.put_function(new)
    except NameTaken as exc:
        raise Refused(str(exc), status=409) from exc
    return new


async def delete_function(client: StokerClient, name: str) -> None:
    await _known_function(client, name)
    await client.delete_function(name)


def builds_of(history: list[Record]) -> list[dict[str, Any]]:
    """A function's builds, oldest first, from its records on the build topic."""
    rows: dict[str, dict[str, Any]] = {}
    for record in history:
        if not isinstance(record, BuildStarted | BuildFinished):
            continue
        row = rows.setdefault(record.build_id, {"build": record.build_id})
        if isinstance(record, BuildStarted):
            row.update(started=record.at_ms, commit=record.commit, ref=record.ref, status="building")
        else:
            row.update(
                status=record.status,
                commit=record.commit or row.get("commit"),
                digest=record.digest,
                duration_ms=round(record.duration_ms, 1),
                reason=record.reason,
                log_uri=record.log_uri,
            )
    return sorted(rows.values(), key=lambda r: r.get("started", 0))


async def builds(client: StokerClient, name: str) -> list[dict[str, Any]]:
    return builds_of(await client.history(client.topics.build, key=name))


async def build_log(client: StokerClient, name: str, build: str) -> bytes:
    found = [b for b in await builds(client, name) if b["build"] == build]
    if not found or not found[0].get("log_uri"):
        raise Refused(f"no finished build {build!r} of {name!r}")
    try:
        return LocalArtifactStore(client.settings.artifacts_dir).get(found[0]["log_uri"])
    except ArtifactError as exc:
        raise Refused(str(exc)) from exc


async def recent_results(client: StokerClient, name: str, last: int) -> list[InvocationCompleted]:
    """The function's last ``last`` results on the result topic, oldest first."""
    history = await client.history(client.topics.result)
    results = [r for r in history if isinstance(r, InvocationCompleted) and r.function == name]
    return results[-last:]


# ----- workflows ----------------------------------------------------------------------------------


class WorkflowRefused(Refused):
    """A definition that does not validate: every problem with its line (0: not tied to one)."""

    def __init__(self, message: str, errors: list[tuple[int, str]]) -> None:
        super().__init__(message, status=400)
        self.errors = errors


async def put_workflow(client: StokerClient, name: str, text: str, *, replace: bool) -> WorkflowSpec:
    """Create (or with ``replace``, replace) a workflow from its YAML."""
    from services.workflow.dsl import WorkflowInvalid, load

    functions = await client.functions()
    current = (await client.table(client.topics.workflow, WorkflowSpec)).get(name)
    if current is not None and not replace:
        raise Refused(f"workflow {name!r} exists; replace it (PUT, or `stoker wf create --update`)", status=409)
    if current is None and replace:
        raise Refused(f"no workflow named {name!r}")
    if name in functions:
        raise Refused(f"{name!r} is a function; a workflow needs a name of its own", status=409)
    try:
        spec = load(name, text, lambda fn: fn in functions)
    except WorkflowInvalid as exc:
        raise WorkflowRefused(f"workflow {name!r} is not valid ({len(exc.errors)} problem(s))", exc.errors) from exc
    if isinstance(current, WorkflowSpec):
        spec = spec.model_copy(update={"revision": current.revision + 1})
    try:
        await client.put_workflow(spec)
    except NameTaken as exc:
        raise Refused(str(exc), status=409) from exc
    return spec


async def delete_workflow(client: StokerClient, name: str) -> None:
    if name not in await client.table(client.topics.workflow, WorkflowSpec):
        raise Refused(f"no workflow named {name!r}")
    await client.delete_workflow(name)


def run_status_of(events: list[Record], run_id: str) -> dict[str, Any]:
    """Every step of one run: status, timing, start kind and output."""
    mine = [e for e in events if getattr(e, "run", None) == run_id]
    if not mine or not isinstance(mine[0], RunStarted):
        raise Refused(f"no workflow run {run_id!r}")
    rows: list[dict[str, Any]] = []
    status: dict[str, Any] = {"run": run_id, "workflow": mine[0].workflow.name, "steps": rows}
    started: dict[tuple[str, int | None, int], int] = {}
    for event in mine:
        if isinstance(event, StepStarted):
            started[(event.step, event.item, event.attempt)] = event.at_ms
        elif isinstance(event, StepFinished):
            began = started.get((event.step, event.item, event.attempt))
            rows.append(
                {
                    "step": event.step,
                    "item": event.item,
                    "attempt": event.attempt,
                    "status": event.status,
                    "took_ms": event.at_ms - began if began else None,
                    "start": event.start,
                    "output": event.output,
                    "error": event.error.model_dump() if event.error else None,
                }
            )
        elif isinstance(event, RunFinished):
            status.update(
                status=event.status,
                output=event.output,
                error=event.error.model_dump() if event.error else None,
                took_ms=event.at_ms - mine[0].at_ms,
            )
    return status


async def run_status(client: StokerClient, run_id: str) -> dict[str, Any]:
    return run_status_of(await client.history(client.topics.workflow_run), run_id)


async def runs_of(client: StokerClient, workflow: str, last: int) -> list[dict[str, Any]]:
    """A workflow's last runs: status and duration."""
    from services.workflow.plan import replay

    by_run: dict[str, list[Any]] = {}
    for event in await client.history(client.topics.workflow_run):
        by_run.setdefault(getattr(event, "run", ""), []).append(event)
    shown = []
    for events in by_run.values():
        if isinstance(events[0], RunStarted) and events[0].workflow.name == workflow:
            state = replay(events)
            shown.append(
                {
                    "run": state.run,
                    "started_ms": state.started_ms,
                    "status": state.status or "running",
                    "took_ms": state.finished_ms - state.started_ms if state.finished else None,
                    "failed_step": state.failed_step,
                }
            )
    return shown[-last:]


# ----- tokens -------------------------------------------------------------------------------------


async def tokens(client: StokerClient) -> dict[str, TokenIssued | TokenRevoked]:
    rows: dict[str, Any] = await client.table(client.topics.token, TokenIssued, TokenRevoked)
    return rows


async def create_token(
    client: StokerClient,
    scopes: list[str],
    *,
    name: str = "",
    expires_in_s: float | None = None,
    rate_per_s: float | None = None,
    by: str = "",
) -> tuple[str, TokenIssued]:
    """A new token: the token string (shown once, never stored) and its record (only its hash)."""
    try:
        auth.check_scopes(scopes)
    except ValueError as exc:
        raise Refused(str(exc), status=400) from exc
    if rate_per_s is not None and rate_per_s < 0:
        raise Refused("rate_per_s is 0 (no limit) or more", status=400)
    token, ident, digest = auth.new_token()
    expires = now_ms() + int(expires_in_s * 1000) if expires_in_s is not None else None
    record = TokenIssued(
        id=ident, name=name, scopes=scopes, digest=digest, rate_per_s=rate_per_s, expires_ms=expires, by=by
    )
    await client.send(record, client.topics.token, ident)
    return token, record


async def revoke_token(client: StokerClient, ident: str, *, by: str = "") -> None:
    current = (await tokens(client)).get(ident)
    if current is None:
        raise Refused(f"no token {ident!r}")
    if isinstance(current, TokenRevoked):
        return
    await client.send(TokenRevoked(id=ident, name=current.name, by=by), client.topics.token, ident)


def token_row(record: TokenIssued | TokenRevoked) -> dict[str, Any]:
    """A token as listed: never its hash."""
    if isinstance(record, TokenRevoked):
        return {"id": record.id, "name": record.name, "state": "revoked", "revoked_ms": record.at_ms}
    state = "expired" if record.expires_ms is not None and record.expires_ms <= now_ms() else "active"
    return {
        **record.model_dump(mode="json", include={"id", "name", "scopes", "rate_per_s", "expires_ms", "by"}),
        "created_ms": record.created_ms,
        "state": state,
    }
