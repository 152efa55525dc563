"""Against a live Kubernetes cluster (``KUBECONFIG``): ``pytest -m k8s tests/k8s``.

Nothing here changes the cluster: manifests go through a server-side dry run, taint patches
through ``dryRun=All``. The default run (``pytest tests``) deselects these tests; selected without
``KUBECONFIG`` they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from deploy.render import manifest_text, render_chart
from events import Taint
from events.cluster import NodeObserved
from services.nodewatch.app import Nodewatch, PatchFailed, follow_nodes
from services.nodewatch.book import NodeBook
from services.nodewatch.mapping import node_to_registration, taint_patch
from services.nodewatch.settings import NodewatchSettings

pytestmark = pytest.mark.k8s

PROBE = Taint(key="stoker.io/pytest-probe", value="dry-run", effect="NoSchedule")
NAMESPACE = os.environ.get("STOKER_K8S_NAMESPACE", "stoker")


def require_kubeconfig() -> str:
    """The kubeconfig of the cluster under test; without one the test fails (never skips: a k8s run
    that tested nothing must not look green)."""
    value = os.environ.get("KUBECONFIG", "")
    if not value:
        pytest.fail(
            "KUBECONFIG is not set: the k8s tests run against a live cluster. "
            "Point KUBECONFIG at its kubeconfig and run `pytest -m k8s tests/k8s`.",
            pytrace=False,
        )
    missing = [p for p in value.split(os.pathsep) if p and not Path(p).is_file()]
    if missing:
        pytest.fail(f"KUBECONFIG names files that do not exist: {missing}", pytrace=False)
    return value


async def _api() -> client.ApiClient:
    await config.load_kube_config()
    return client.ApiClient()


async def _raw(response: Any) -> Any:
    try:
        body = await response.read()
        if response.status >= 300:
            raise ApiException(status=response.status, reason=body.decode(errors="replace")[:300])
        return orjson.loads(body)
    finally:
        response.release()


async def _nodes(api: client.ApiClient) -> list[dict[str, Any]]:
    listing = await _raw(await client.CoreV1Api(api).list_node(_preload_content=False))
    items: list[dict[str, Any]] = listing["items"]
    return items


def test_every_node_maps_to_a_registration() -> None:
    require_kubeconfig()

    async def go() -> list[dict[str, Any]]:
        api = await _api()
        try:
            return await _nodes(api)
        finally:
            await api.close()

    nodes = asyncio.run(go())
    assert nodes, "the cluster lists no nodes"
    for node in nodes:
        registration = node_to_registration(node)
        record = NodeObserved(**registration)
        assert record.node == node["metadata"]["name"]
        assert record.capacity.cpu_millis > 0 and record.capacity.memory_mb > 0
        assert record.labels.get("kubernetes.io/hostname")


def test_rendered_manifests_pass_a_server_side_dry_run(tmp_path: Path) -> None:
    require_kubeconfig()
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: the live-cluster tests need it (apt-get install kubectl)")
    # Into a namespace that exists: a dry run creates no namespace for the others to land in.
    text = manifest_text(render_chart(values={"createNamespace": False}, namespace="default"))
    manifest = tmp_path / "stoker.yaml"
    manifest.write_text(text)
    done = subprocess.run(
        [kubectl, "apply", "--dry-run=server", "-f", str(manifest)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for name in ("deployment.apps/stoker-gateway", "daemonset.apps/stoker-agent-runtime", "clusterrole"):
        assert name in done.stdout


def test_taint_patches_are_accepted_and_a_stale_one_is_refused() -> None:
    require_kubeconfig()

    async def go() -> None:
        api = await _api()
        core = client.CoreV1Api(api)
        try:
            node = (await _nodes(api))[0]
            name = node["metadata"]["name"]
            current = node["spec"].get("taints")
            patch = taint_patch(current, [PROBE])
            patched = await _raw(await core.patch_node(name, patch, dry_run="All", _preload_content=False))
            assert {"key": PROBE.key, "value": PROBE.value, "effect": PROBE.effect} in patched["spec"]["taints"]
            for taint in current or []:  # every other taint kept
                assert taint in patched["spec"]["taints"]
            stale = taint_patch([{"key": "stoker.io/not-there", "effect": "NoSchedule"}], [PROBE])
            with pytest.raises(ApiException) as refused:
                await _raw(await core.patch_node(name, stale, dry_run="All", _preload_content=False))
            assert refused.value.status == 422
            again = await _raw(await core.read_node(name, _preload_content=False))
            assert PROBE.key not in [t["key"] for t in again["spec"].get("taints") or []]  # dry runs only
        finally:
            await api.close()

    asyncio.run(go())


def test_nodewatch_lists_and_watches_the_cluster() -> None:
    require_kubeconfig()
    published: dict[str, NodeObserved | None] = {}

    async def publish(node: str, record: NodeObserved | None) -> None:
        published[node] = record

    async def patch(name: str, body: list[dict[str, Any]]) -> dict[str, Any]:
        raise PatchFailed(0, "this test patches nothing")

    async def go() -> set[str]:
        api = await _api()
        try:
            names = {n["metadata"]["name"] for n in await _nodes(api)}
            settings = NodewatchSettings.from_env(
                {"STOKER_NODEWATCH_SELECTOR": "", "STOKER_NODEWATCH_WATCH_TIMEOUT_S": "5"}
            )
            task = asyncio.create_task(follow_nodes(api, Nodewatch(NodeBook(), publish, patch), settings))
            try:
                for _ in range(300):
                    if names <= published.keys():
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(6)  # past one server-side watch timeout: the watch resumes
                assert not task.done(), task
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            return names
        finally:
            await api.close()

    names = asyncio.run(go())
    assert names <= published.keys()
    assert all(published[n] is not None for n in names)


def test_deployed_stoker_is_ready() -> None:
    """When the manifests were applied (namespace STOKER_K8S_NAMESPACE, default stoker)."""
    require_kubeconfig()

    async def go() -> tuple[list[Any], list[Any]]:
        api = await _api()
        try:
            try:
                await client.CoreV1Api(api).read_namespace(NAMESPACE)
            except ApiException as exc:
                if exc.status == 404:
                    pytest.fail(f"Stoker is not deployed (no namespace {NAMESPACE}): apply deploy/k8s/ first")
                raise
            apps = client.AppsV1Api(api)
            deployments = (await apps.list_namespaced_deployment(NAMESPACE)).items
            daemonsets = (await apps.list_namespaced_daemon_set(NAMESPACE)).items
            return deployments, daemonsets
        finally:
            await api.close()

    deployments, daemonsets = asyncio.run(go())
    names = {d.metadata.name for d in deployments}
    assert {f"stoker-{s}" for s in ("gateway", "dispatcher", "poolmgr", "builder", "nodewatch")} <= names
    for d in deployments:
        assert (d.status.ready_replicas or 0) == d.spec.replicas, f"{d.metadata.name} is not ready"
    for ds in daemonsets:
        assert ds.status.number_ready == ds.status.desired_number_scheduled, f"{ds.metadata.name} is not ready"
