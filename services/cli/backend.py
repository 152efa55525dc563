"""What the CLI's management commands talk to: the gateway's management API with a token (the default), or
Kafka directly (``--direct`` / ``STOKER_DIRECT=1``: the platform operator's path, which needs broker access).

Both run the same actions and raise :class:`operations.Refused` with the same messages, so a command prints the
same whichever way it went.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import httpx

from events import FunctionSpec, Taint, WorkflowSpec
from events.function import CodeSource
from services.common import operations
from services.common.client import StokerClient, deadline_in, store_archive
from services.common.settings import CommonSettings


class Backend(Protocol):
    async def functions(self) -> dict[str, FunctionSpec]: ...
    async def create_function(
        self, fields: dict[str, Any], archive: bytes | None, git: dict[str, str] | None
    ) -> FunctionSpec: ...
    async def update_function(self, name: str, changes: dict[str, Any], archive: bytes | None) -> FunctionSpec: ...
    async def delete_function(self, name: str) -> None: ...
    async def prewarm(self, name: str, count: int) -> None: ...
    async def isolate(self, name: str, seconds: float) -> None: ...
    async def release(self, name: str) -> None: ...
    async def configure_node(self, name: str, **changes: Any) -> None: ...
    async def builds(self, name: str) -> list[dict[str, Any]]: ...
    async def build_log(self, name: str, build: str) -> bytes: ...
    async def recent_results(self, name: str, last: int) -> list[dict[str, Any]]: ...
    async def workflows(self) -> dict[str, WorkflowSpec]: ...
    async def put_workflow(self, name: str, text: str, *, replace: bool) -> WorkflowSpec: ...
    async def delete_workflow(self, name: str) -> None: ...
    async def runs_of(self, name: str, last: int) -> list[dict[str, Any]]: ...
    async def run_status(self, run_id: str) -> dict[str, Any]: ...
    async def invoke(self, name: str, payload: Any, timeout_s: float) -> dict[str, Any]: ...
    async def __aenter__(self) -> Backend: ...
    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None: ...


def token_for(common: CommonSettings) -> str | None:
    """``STOKER_TOKEN``, or the admin token ``stoker up`` left in the state folder."""
    if os.environ.get("STOKER_TOKEN"):
        return os.environ["STOKER_TOKEN"].strip()
    path = common.home / "admin-token"
    return path.read_text().strip() if path.is_file() else None


def api_url() -> str:
    return os.environ.get("STOKER_API_URL") or f"http://127.0.0.1:{os.environ.get('STOKER_HTTP_PORT') or 8080}"


def direct_requested() -> bool:
    return os.environ.get("STOKER_DIRECT", "").lower() in ("1", "true", "yes", "on")


class Direct:
    """Kafka, through :class:`StokerClient` and :mod:`services.common.operations`."""

    def __init__(self, common: CommonSettings) -> None:
        self.common = common
        self._client: StokerClient | None = None

    @property
    def c(self) -> StokerClient:
        assert self._client is not None
        return self._client

    async def __aenter__(self) -> Direct:
        self._client = await StokerClient(self.common).__aenter__()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.c.__aexit__(et, e, tb)

    async def functions(self) -> dict[str, FunctionSpec]:
        return await self.c.functions()

    async def create_function(
        self, fields: dict[str, Any], archive: bytes | None, git: dict[str, str] | None
    ) -> FunctionSpec:
        if archive is not None:
            source = store_archive(self.common, archive)
        else:
            assert git is not None
            path = git.get("path", "").strip("/") or None
            source = CodeSource(kind="git", git_url=git["url"], git_branch=git.get("branch", "main"), git_path=path)
        try:
            spec = FunctionSpec.model_validate({**fields, "source": source})
        except ValueError as exc:
            raise operations.Refused(f"not a valid function: {exc}", status=400) from exc
        await operations.create_function(self.c, spec)
        return spec

    async def update_function(self, name: str, changes: dict[str, Any], archive: bytes | None) -> FunctionSpec:
        if archive is not None:
            changes = {**changes, "source": store_archive(self.common, archive).model_dump()}
        return await operations.update_function(self.c, name, changes)

    async def delete_function(self, name: str) -> None:
        await operations.delete_function(self.c, name)

    async def prewarm(self, name: str, count: int) -> None:
        await operations.prewarm(self.c, name, count, reason="stoker fn prewarm")

    async def isolate(self, name: str, seconds: float) -> None:
        await operations.isolate(self.c, name, seconds, reason="stoker fn isolate")

    async def release(self, name: str) -> None:
        await operations.release_isolation(self.c, name)

    async def configure_node(self, name: str, **changes: Any) -> None:
        await operations.configure_node(self.c, name, **changes)

    async def builds(self, name: str) -> list[dict[str, Any]]:
        return await operations.builds(self.c, name)

    async def build_log(self, name: str, build: str) -> bytes:
        return await operations.build_log(self.c, name, build)

    async def recent_results(self, name: str, last: int) -> list[dict[str, Any]]:
        return [r.model_dump(mode="json") for r in await operations.recent_results(self.c, name, last)]

    async def workflows(self) -> dict[str, WorkflowSpec]:
        rows: dict[str, Any] = await self.c.table(self.c.topics.workflow, WorkflowSpec)
        return rows

    async def put_workflow(self, name: str, text: str, *, replace: bool) -> WorkflowSpec:
        return await operations.put_workflow(self.c, name, text, replace=replace)

    async def delete_workflow(self, name: str) -> None:
        await operations.delete_workflow(self.c, name)

    async def runs_of(self, name: str, last: int) -> list[dict[str, Any]]:
        return await operations.runs_of(self.c, name, last)

    async def run_status(self, run_id: str) -> dict[str, Any]:
        return await operations.run_status(self.c, run_id)

    async def invoke(self, name: str, payload: Any, timeout_s: float) -> dict[str, Any]:
        result = await self.c.invoke(name, payload, timeout_s=timeout_s, deadline_ms=deadline_in(timeout_s))
        return result.model_dump(mode="json", exclude_none=True)


class Http:
    """The gateway's management API, with a token."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url.rstrip("/"), token
        self._http: httpx.AsyncClient | None = None

    @property
    def h(self) -> httpx.AsyncClient:
        assert self._http is not None
        return self._http

    async def __aenter__(self) -> Http:
        headers = {"Authorization": f"Bearer {self.token}"}
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=60)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.h.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            answer = await self.h.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise operations.Refused(
                f"could not reach the gateway at {self.url}: {exc} (STOKER_API_URL; --direct talks to Kafka)", 503
            ) from exc
        if answer.status_code >= 400:
            try:
                body = answer.json()
            except ValueError:
                body = {"error": answer.text}
            message = body.get("error") if isinstance(body, dict) else None
            if not message and isinstance(body, dict) and "detail" in body:
                message = "; ".join(
                    f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in body["detail"]
                )
            if isinstance(body, dict) and "problems" in body:
                problems = [(p["line"], p["reason"]) for p in body["problems"]]
                raise operations.WorkflowRefused(str(message), problems)
            raise operations.Refused(str(message or answer.status_code), answer.status_code)
        return answer

    async def functions(self) -> dict[str, FunctionSpec]:
        rows = (await self._call("GET", "/api/v1/functions")).json()
        return {row["name"]: FunctionSpec.model_validate(row) for row in rows}

    async def create_function(
        self, fields: dict[str, Any], archive: bytes | None, git: dict[str, str] | None
    ) -> FunctionSpec:
        body: dict[str, Any] = {**fields}
        if archive is not None:
            body["archive"] = base64.b64encode(archive).decode()
        if git is not None:
            body["git"] = git
        return FunctionSpec.model_validate((await self._call("POST", "/api/v1/functions", json=_jsonable(body))).json())

    async def update_function(self, name: str, changes: dict[str, Any], archive: bytes | None) -> FunctionSpec:
        spec: dict[str, Any] | None = None
        if changes:
            spec = (await self._call("PATCH", f"/api/v1/functions/{name}", json=_jsonable(changes))).json()
        if archive is not None:
            headers = {"Content-Type": "application/zip"}
            spec = (
                await self._call("PUT", f"/api/v1/functions/{name}/archive", content=archive, headers=headers)
            ).json()
        if spec is None:
            raise operations.Refused("nothing to change", 400)
        return FunctionSpec.model_validate(spec)

    async def delete_function(self, name: str) -> None:
        await self._call("DELETE", f"/api/v1/functions/{name}")

    async def prewarm(self, name: str, count: int) -> None:
        await self._call(
            "POST", f"/api/v1/functions/{name}/prewarm", json={"count": count, "reason": "stoker fn prewarm"}
        )

    async def isolate(self, name: str, seconds: float) -> None:
        await self._call(
            "PUT", f"/api/v1/functions/{name}/isolation", json={"seconds": seconds, "reason": "stoker fn isolate"}
        )

    async def release(self, name: str) -> None:
        await self._call("DELETE", f"/api/v1/functions/{name}/isolation")

    async def configure_node(self, name: str, **changes: Any) -> None:
        if "labels" in changes:
            labels: dict[str, str | None] = changes["labels"]
            body: dict[str, Any] = {
                "set": {k: v for k, v in labels.items() if v is not None},
                "remove": [k for k, v in labels.items() if v is None],
            }
            await self._call("POST", f"/api/v1/nodes/{name}/labels", json=body)
        if changes.get("add_taints") or changes.get("remove_taints"):
            add: list[Taint] = changes.get("add_taints") or []
            body = {"add": [t.model_dump() for t in add], "remove": changes.get("remove_taints") or []}
            await self._call("POST", f"/api/v1/nodes/{name}/taints", json=body)
        if changes.get("drain"):
            await self._call("POST", f"/api/v1/nodes/{name}/drain")
        elif changes.get("unschedulable") is not None:
            await self._call("POST", f"/api/v1/nodes/{name}/{'cordon' if changes['unschedulable'] else 'uncordon'}")

    async def builds(self, name: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = (await self._call("GET", f"/api/v1/functions/{name}/builds")).json()
        return rows

    async def build_log(self, name: str, build: str) -> bytes:
        return (await self._call("GET", f"/api/v1/functions/{name}/builds/{build}/log")).content

    async def recent_results(self, name: str, last: int) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = (
            await self._call("GET", f"/api/v1/functions/{name}/logs", params={"last": last})
        ).json()
        return rows

    async def workflows(self) -> dict[str, WorkflowSpec]:
        rows = (await self._call("GET", "/api/v1/workflows")).json()
        return {row["name"]: WorkflowSpec.model_validate(row) for row in rows}

    async def put_workflow(self, name: str, text: str, *, replace: bool) -> WorkflowSpec:
        headers = {"Content-Type": "application/yaml"}
        answer = await self._call(
            "PUT" if replace else "POST", f"/api/v1/workflows/{name}", content=text, headers=headers
        )
        return WorkflowSpec.model_validate(answer.json())

    async def delete_workflow(self, name: str) -> None:
        await self._call("DELETE", f"/api/v1/workflows/{name}")

    async def runs_of(self, name: str, last: int) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = (
            await self._call("GET", f"/api/v1/workflows/{name}/runs", params={"last": last})
        ).json()
        return rows

    async def run_status(self, run_id: str) -> dict[str, Any]:
        status: dict[str, Any] = (await self._call("GET", f"/api/v1/runs/{run_id}")).json()
        return status

    async def invoke(self, name: str, payload: Any, timeout_s: float) -> dict[str, Any]:
        """Accepted asynchronously, then its result read back from the gateway that accepted it."""
        accepted = (await self._call("POST", f"/async/fn/{name}", json=payload)).json()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            answer = await self._call("GET", f"/invocations/{accepted['id']}")
            if answer.status_code == 200:
                result: dict[str, Any] = answer.json()
                return {k: v for k, v in result.items() if v is not None}
            await asyncio.sleep(0.05)
        raise TimeoutError


def _jsonable(value: dict[str, Any]) -> dict[str, Any]:
    """Spec fields as JSON (tolerations are models)."""
    out = {}
    for key, item in value.items():
        if isinstance(item, list):
            out[key] = [v.model_dump() if hasattr(v, "model_dump") else v for v in item]
        else:
            out[key] = item.model_dump() if hasattr(item, "model_dump") else item
    return out


def backend_for(common: CommonSettings) -> Backend:
    """The management API when a token is at hand and ``--direct`` was not asked for; Kafka otherwise."""
    token = None if direct_requested() else token_for(common)
    if token is None:
        return Direct(common)
    return Http(api_url(), token)


def package(code: Path) -> bytes:
    from services.common.artifacts import package_directory

    return package_directory(code)[0]
