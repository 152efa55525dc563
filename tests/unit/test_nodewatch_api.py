"""nodewatch's Kubernetes I/O (list, watch, resume, 410, JSON patch) against a small fake API server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from kubernetes_asyncio import client

from events import Taint
from events.cluster import NodeObserved, NodeTaintsRequested
from services.nodewatch.app import Nodewatch, PatchFailed, follow_nodes, make_patch
from services.nodewatch.book import NodeBook
from services.nodewatch.settings import NodewatchSettings
from tests.unit.test_nodewatch import RUNTIME_TAINT, k8s_node


class FakeApiServer:
    """Just enough of the Node API: list, watch (with resourceVersion, timeouts, 410), JSON patch."""

    def __init__(self) -> None:
        self.rv = 100
        self.nodes: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[int, str, dict[str, Any]]] = []
        self.oldest_watchable = 0
        self.changed = asyncio.Condition()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.patch_types: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/nodes", self.list_or_watch)
        app.router.add_get("/api/v1/nodes/{name}", self.read)
        app.router.add_patch("/api/v1/nodes/{name}", self.patch)
        return app

    async def put(self, node: dict[str, Any], kind: str = "MODIFIED") -> None:
        async with self.changed:
            self.rv += 1
            node = copy.deepcopy(node)
            node["metadata"]["resourceVersion"] = str(self.rv)
            if kind == "DELETED":
                self.nodes.pop(node["metadata"]["name"], None)
            else:
                self.nodes[node["metadata"]["name"]] = node
            self.events.append((self.rv, kind, node))
            self.changed.notify_all()

    async def list_or_watch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(("GET", request.path, dict(request.query)))
        if request.query.get("watch") not in ("true", "True", "1"):
            body = {
                "kind": "NodeList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.rv)},
                "items": list(self.nodes.values()),
            }
            return web.json_response(body)
        since = int(request.query.get("resourceVersion") or 0)
        timeout = float(request.query.get("timeoutSeconds") or 30)
        response = web.StreamResponse()
        await response.prepare(request)
        if since < self.oldest_watchable:
            gone = {"kind": "Status", "status": "Failure", "reason": "Expired", "message": "too old", "code": 410}
            await response.write(orjson.dumps({"type": "ERROR", "object": gone}) + b"\n")
            return response
        deadline = asyncio.get_running_loop().time() + timeout
        sent = since
        while True:
            for rv, kind, node in [e for e in self.events if e[0] > sent]:
                await response.write(orjson.dumps({"type": kind, "object": node}) + b"\n")
                sent = rv
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return response
            async with self.changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), remaining)

    async def read(self, request: web.Request) -> web.Response:
        node = self.nodes.get(request.match_info["name"])
        return web.json_response(node) if node else web.json_response({"code": 404}, status=404)

    async def patch(self, request: web.Request) -> web.Response:
        self.patch_types.append(request.content_type)
        name = request.match_info["name"]
        node = copy.deepcopy(self.nodes.get(name))
        if node is None:
            return web.json_response({"kind": "Status", "code": 404}, status=404)
        for op in await request.json():
            assert op["path"] == "/spec/taints", op
            if op["op"] == "test" and node["spec"].get("taints") != op["value"]:
                return web.json_response({"kind": "Status", "code": 422, "message": "test failed"}, status=422)
            if op["op"] in ("add", "replace"):
                node["spec"]["taints"] = op["value"]
            elif op["op"] == "remove":
                node["spec"].pop("taints", None)
        await self.put(node)
        return web.json_response(self.nodes[name])


@pytest.fixture
def api_server() -> Callable[[Callable[[FakeApiServer, client.ApiClient], Awaitable[None]]], None]:
    """Runs a scenario with a started fake API server and a client for it."""

    def run(scenario: Callable[[FakeApiServer, client.ApiClient], Awaitable[None]]) -> None:
        async def go() -> None:
            fake = FakeApiServer()
            runner = web.AppRunner(fake.app())
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # noqa: SLF001
            configuration = client.Configuration(host=f"http://127.0.0.1:{port}")
            api = client.ApiClient(configuration)
            try:
                await scenario(fake, api)
            finally:
                await api.close()
                await runner.cleanup()

        asyncio.run(asyncio.wait_for(go(), 30))

    return run


async def until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def following(api: client.ApiClient, watcher: Nodewatch, timeout_s: int = 1) -> AsyncIterator[None]:
    settings = NodewatchSettings.from_env({"STOKER_NODEWATCH_WATCH_TIMEOUT_S": str(timeout_s)})
    task = asyncio.create_task(follow_nodes(api, watcher, settings))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert not task.done() or task.cancelled()


def test_list_watch_resume_and_relist(api_server: Any) -> None:
    published: list[tuple[str, NodeObserved | None]] = []

    async def publish(node: str, record: NodeObserved | None) -> None:
        published.append((node, record))

    async def no_patch(name: str, body: list[dict[str, Any]]) -> dict[str, Any]:
        raise PatchFailed(0, "unused")

    async def scenario(fake: FakeApiServer, api: client.ApiClient) -> None:
        await fake.put(k8s_node("a"), "ADDED")
        await fake.put(k8s_node("b"), "ADDED")
        watcher = Nodewatch(NodeBook(), publish, no_patch)
        async with following(api, watcher):
            await until(lambda: {n for n, _ in published} == {"a", "b"})
            first = fake.requests[0]
            assert first[2]["labelSelector"] == "stoker.io/role in (runtime,isolated)"
            await fake.put(k8s_node("a", unschedulable=True))
            await until(lambda: len(published) == 3)
            assert published[-1][1] is not None and published[-1][1].unschedulable
            await asyncio.sleep(1.3)  # the watch timed out server-side and resumed
            await fake.put(k8s_node("b"), "DELETED")
            await until(lambda: published[-1] == ("b", None))
            watches = [q for _, _, q in fake.requests if q.get("watch")]
            assert len(watches) >= 2 and int(watches[-1]["resourceVersion"]) > int(watches[0]["resourceVersion"])
            # history compacted away: the next watch gets 410 Gone, and nodewatch lists again
            fake.oldest_watchable = fake.rv + 1000
            await fake.put(k8s_node("c"), "ADDED")
            await until(lambda: len([q for _, _, q in fake.requests if not q.get("watch")]) >= 2, timeout_s=8)
            fake.oldest_watchable = 0
            await until(lambda: "c" in {n for n, _ in published}, timeout_s=8)
            await fake.put(k8s_node("c", labels={"stoker.io/role": "isolated"}))
            await until(
                lambda: published[-1][1] is not None and published[-1][1].labels == {"stoker.io/role": "isolated"},
                timeout_s=8,
            )

    api_server(scenario)


def test_taint_requests_become_json_patches(api_server: Any) -> None:
    published: list[tuple[str, NodeObserved | None]] = []

    async def publish(node: str, record: NodeObserved | None) -> None:
        published.append((node, record))

    async def scenario(fake: FakeApiServer, api: client.ApiClient) -> None:
        await fake.put(k8s_node("a", taints=[RUNTIME_TAINT]), "ADDED")
        watcher = Nodewatch(NodeBook(), publish, make_patch(api))
        overloaded = Taint(key="stoker.io/overloaded", value="cpu", effect="NoSchedule")
        wish = NodeTaintsRequested(node="a", taints=[overloaded], reason="cpu", requested_by="throttler")
        async with following(api, watcher):
            await until(lambda: len(published) == 1)
            await watcher.request(b"a", wish.model_dump_json().encode())
            await until(lambda: overloaded in (published[-1][1].taints if published[-1][1] else []))
            assert fake.nodes["a"]["spec"]["taints"] == [
                RUNTIME_TAINT,
                {"key": "stoker.io/overloaded", "value": "cpu", "effect": "NoSchedule"},
            ]
            assert fake.patch_types == ["application/json-patch+json"]
            # a patch computed from a state that is no longer the node's is refused (422) by its
            # test op; the change that made it stale brings the node to the wish again
            watcher.book.taints["a"] = [{"key": "stoker.io/stale", "effect": "NoSchedule"}]
            await watcher.retry()
            assert len(fake.patch_types) == 2 and len(fake.nodes["a"]["spec"]["taints"]) == 2  # refused
            other = copy.deepcopy(fake.nodes["a"])
            other["spec"]["taints"] = [RUNTIME_TAINT]
            await fake.put(other)
            await until(lambda: len(fake.patch_types) == 3)
            await until(lambda: len(fake.nodes["a"]["spec"]["taints"]) == 2)
            release = NodeTaintsRequested(node="a", keys=["stoker.io/overloaded"], reason="quiet")
            await watcher.request(b"a", release.model_dump_json().encode())
            await until(lambda: fake.nodes["a"]["spec"]["taints"] == [RUNTIME_TAINT])
            missing = make_patch(api)
            with pytest.raises(PatchFailed) as refused:
                await missing("nope", [{"op": "remove", "path": "/spec/taints"}])
            assert refused.value.status == 404

    api_server(scenario)
