"""Composition root of nodewatch: the Kubernetes API on one side, Kafka on the other.

* Nodes: list, then watch from the list's resourceVersion (resuming after each server timeout,
  listing again after ``410 Gone``); each change goes through :class:`~services.nodewatch.book.NodeBook`
  and, when the registration changed, a ``node.observed`` record is published on the node topic
  (key ``k8s/<node>``; a tombstone when the node goes).
* Taints: the compacted node-taint topic is followed from its start (no group: every record is the
  whole wish for one node); each wish, and each change of a wished-for node, is turned into a JSON
  patch of the Node (:func:`~services.nodewatch.mapping.taint_patch`), which tests the taints it
  replaces, so a node changed meanwhile is patched again from its newer state.

The Kubernetes JSON is kept raw (``_preload_content=False``, watch ``raw_object``): the patch's
``test`` compares ``spec.taints`` exactly as the API serialises them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import ValidationError

from events.cluster import NodeObserved, NodeTaintsRequested, observed_key
from events.topics import TopicSpec
from services.common.admin import ensure_topics
from services.common.broker import make_broker
from services.common.runner import configure_logging, serve
from services.common.telemetry import setup_tracing
from services.common.views import Reader, dead_letters_to
from services.nodewatch.book import NodeBook
from services.nodewatch.settings import NodewatchSettings

log = logging.getLogger("stoker.nodewatch")

Publish = Callable[[str, NodeObserved | None], Awaitable[None]]
"""(node, record) -> published; ``None`` is a tombstone."""
Patch = Callable[[str, list[dict[str, Any]]], Awaitable[Mapping[str, Any]]]
"""(node, JSON patch) -> the patched Node; raises :class:`PatchFailed`."""


class PatchFailed(Exception):
    """The API refused a patch; ``status`` is its HTTP status (422: a test failed, the node changed)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


class Nodewatch:
    """Acts on node events and taint requests, one at a time (a lock), through ``publish`` and ``patch``."""

    def __init__(self, book: NodeBook, publish: Publish, patch: Patch) -> None:
        self.book = book
        self._publish = publish
        self._patch = patch
        self._lock = asyncio.Lock()

    async def listed(self, nodes: list[Mapping[str, Any]]) -> None:
        """A full list of the selected nodes (at start, and after the watch expired)."""
        async with self._lock:
            changed, gone, unreadable = self.book.resync(nodes)
            for reason in unreadable:
                log.warning("cannot read node %s", reason)
            for name in gone:
                log.info("node %s is gone", name)
                await self._publish(name, None)
            for registration in changed:
                await self._publish(registration["node"], NodeObserved(**registration))
            for name in sorted(self.book.taints):
                await self._reconcile(name)

    async def event(self, kind: str, node: Mapping[str, Any]) -> None:
        """One watch event (ADDED, MODIFIED, DELETED; BOOKMARK carries no node)."""
        async with self._lock:
            name = (node.get("metadata") or {}).get("name")
            if kind == "DELETED":
                if isinstance(name, str) and self.book.remove(name):
                    log.info("node %s deleted", name)
                    await self._publish(name, None)
                return
            if kind not in ("ADDED", "MODIFIED") or not isinstance(name, str):
                return
            await self._observe(node)
            await self._reconcile(name)

    async def request(self, key: bytes | None, value: bytes | None) -> None:
        """One raw record of the node-taint topic (key = node; a tombstone withdraws the wish)."""
        node = key.decode(errors="replace") if key else ""
        if not node:
            log.warning("taint request without a key: ignored")
            return
        wish = None
        if value:
            try:
                wish = NodeTaintsRequested.model_validate(orjson.loads(value))
            except (orjson.JSONDecodeError, ValidationError) as exc:
                log.warning("bad taint request for %s: %s", node, exc)
                return
        await self.wish(node, wish)

    async def wish(self, node: str, wish: NodeTaintsRequested | None) -> None:
        """The latest wish for ``node``'s taints (None: withdrawn), as the node-taint table reads it."""
        async with self._lock:
            if wish is None:
                self.book.forget_wish(node)
                log.info("taint request for %s withdrawn (its taints stay as they are)", node)
                return
            if wish.node != node:
                log.warning("taint request keyed %s names node %s: ignored", node, wish.node)
                return
            try:
                self.book.want(node, wish.taints, wish.owned_keys, wish.reason)
            except ValueError as exc:
                log.warning("taint request for %s refused: %s", node, exc)
                return
            await self._reconcile(node)

    async def retry(self) -> None:
        """Try again every wish that is not applied yet (after an API error, say)."""
        async with self._lock:
            for node in self.book.pending():
                await self._reconcile(node)

    async def _observe(self, node: Mapping[str, Any]) -> None:
        try:
            registration = self.book.observe(node)
        except ValueError as exc:  # QuantityError or a nameless node: keep the last good record
            log.warning("cannot read node %s: %s", (node.get("metadata") or {}).get("name"), exc)
            return
        if registration is not None:
            await self._publish(registration["node"], NodeObserved(**registration))

    async def _reconcile(self, name: str) -> None:
        patch = self.book.patch(name)
        if not patch:
            return
        wish = self.book.wishes[name]
        try:
            patched = await self._patch(name, patch)
        except PatchFailed as exc:
            if exc.status in (409, 422):
                log.info("node %s changed before its taints were patched: again from its next state", name)
            else:
                log.warning("patching the taints of node %s failed: %s", name, exc)
            return
        log.info("taints of node %s set for keys %s: %s", name, list(wish.keys), wish.reason or "requested")
        await self._observe(patched)


# --------------------------------------------------------------------------- Kubernetes


async def kube_client() -> Any:
    """An API client: the pod's service account in a cluster, else ``KUBECONFIG`` / ``~/.kube/config``."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        await config.load_kube_config()
    return client.ApiClient()


async def _raw(response: Any) -> Any:
    """The JSON of a response fetched with ``_preload_content=False``; raises on an error status."""
    try:
        body = await response.read()
        if not 200 <= response.status < 300:
            raise ApiException(status=response.status, reason=body.decode(errors="replace")[:500])
        return orjson.loads(body)
    finally:
        response.release()


async def follow_nodes(api: Any, watcher: Nodewatch, settings: NodewatchSettings) -> None:
    """List and watch the selected Nodes forever; API trouble is logged and retried with backoff."""
    core = client.CoreV1Api(api)
    selector = settings.label_selector  # "" selects every node
    backoff = 1.0
    while True:
        try:
            listing = await _raw(await core.list_node(label_selector=selector, _preload_content=False))
            await watcher.listed(listing.get("items") or [])
            version = listing["metadata"]["resourceVersion"]
            log.info("following %d nodes (%s)", len(listing.get("items") or []), settings.label_selector or "all")
            backoff = 1.0
            while True:
                stream = watch.Watch()
                try:
                    async for event in stream.stream(
                        core.list_node,
                        resource_version=version,
                        timeout_seconds=settings.watch_timeout_s,
                        allow_watch_bookmarks=True,
                        _request_timeout=settings.watch_timeout_s + 30,
                        label_selector=selector,
                    ):
                        await watcher.event(event["type"], event["raw_object"])
                    version = stream.resource_version or version
                finally:
                    await stream.close()
        except ApiException as exc:
            if exc.status == 410:  # the watch fell behind the API server's history: list again
                log.info("node watch expired: listing again")
            else:
                log.warning("node list/watch failed: %s %s", exc.status, exc.reason)
        except Exception as exc:  # the API unreachable, a list error, aiohttp's errors: log, back off, retry
            log.warning("node list/watch failed: %r", exc)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 30.0)


def make_patch(api: Any) -> Patch:
    core = client.CoreV1Api(api)

    async def patch(name: str, body: list[dict[str, Any]]) -> Mapping[str, Any]:
        try:
            # A list body goes as application/json-patch+json.
            node: Mapping[str, Any] = await _raw(await core.patch_node(name, body, _preload_content=False))
        except ApiException as exc:
            raise PatchFailed(exc.status or 0, str(exc.reason)) from exc
        return node

    return patch


# --------------------------------------------------------------------------- Kafka


async def run(settings: NodewatchSettings) -> None:
    common = settings.common
    configure_logging(common)
    provider = setup_tracing("nodewatch", common)
    broker = make_broker(common, "nodewatch", provider)
    api = await kube_client()

    async def publish(node: str, record: NodeObserved | None) -> None:
        await broker.publish(record, common.topics.node, key=observed_key(node).encode())

    watcher = Nodewatch(NodeBook(settings.default_max_instances), publish, make_patch(api))
    # The node-taint topic from its start (compacted: the latest wish per node), one wish at a time.
    reader = Reader(common.bootstrap, "nodewatch", dead_letters=dead_letters_to(broker, common.topics.dlq))
    reader.table(settings.taint_topic, (NodeTaintsRequested,), on_change=watcher.wish)

    async def create_topic() -> None:
        await ensure_topics(common.bootstrap, [TopicSpec(settings.taint_topic, compacted=True)])

    async def nodes() -> None:
        await follow_nodes(api, watcher, settings)

    async def retries() -> None:
        while True:
            await asyncio.sleep(settings.retry_s)
            await watcher.retry()

    async def close_api() -> None:
        with contextlib.suppress(Exception):
            await api.close()

    await serve(
        "nodewatch",
        common,
        broker,
        on_start=[create_topic, reader.start],
        background=[nodes, retries],
        on_stop=[reader.stop, close_api],
        ready_facts={"selector": settings.label_selector, "taint_topic": settings.taint_topic},
    )
    provider.shutdown()


def main() -> None:
    try:
        asyncio.run(run(NodewatchSettings.from_env()))
    except config.ConfigException as exc:
        message = f"nodewatch: no Kubernetes API to talk to ({exc}): run it in a pod, or set KUBECONFIG"
        raise SystemExit(message) from exc
