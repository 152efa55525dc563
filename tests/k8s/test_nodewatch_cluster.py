"""nodewatch against the real API server, with the chart's own service account and a real broker.

The test plays the kubelet and the operator (it creates Nodes, sets their status, relabels and
retaints them, with the admin token) and the throttler (it publishes taint requests); nodewatch
runs as its own process (`python -m services.nodewatch`), authenticated as the chart's
``stoker-nodewatch`` service account, exactly the rights the chart's ClusterRole grants.
"""

from __future__ import annotations

import asyncio
import datetime
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from events import Taint
from events.cluster import NodeObserved, NodeTaintsRequested, observed_key
from services.common.settings import CommonSettings
from services.nodewatch.mapping import taint_patch
from tests.helpers import ServiceProcess, assert_eventually
from tests.k8s.cluster import Cluster
from tests.k8s.conftest import NAMESPACE

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"


def make_node(cluster: Cluster, name: str, labels: dict[str, str], taints: list[dict[str, str]] | None = None) -> None:
    """A Node as a kubelet registers one: metadata and spec, then its status (allocatable, Ready)."""
    body = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, **labels},
            "annotations": {"stoker.io/max-instances": "6"},
        },
        "spec": {"taints": taints or []},
    }
    status, answer = cluster.request("POST", "/api/v1/nodes", body)
    assert status == 201, answer
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    node_status = {
        "status": {
            "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
            "allocatable": {"cpu": "3500m", "memory": "7680Mi", "pods": "110"},
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "played by the test",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
        }
    }
    status, answer = cluster.request("PATCH", f"/api/v1/nodes/{name}/status", node_status, content_type=MERGE_PATCH)
    assert status == 200, answer


def node(cluster: Cluster, name: str) -> dict[str, Any]:
    status, answer = cluster.request("GET", f"/api/v1/nodes/{name}")
    assert status == 200, answer
    result: dict[str, Any] = answer
    return result


def read_latest(bootstrap: str, topic: str) -> dict[str, NodeObserved | None]:
    """The node topic read from its start to its end: the latest ``k8s/…`` record per key."""

    async def go() -> dict[str, NodeObserved | None]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            partitions = [p for p in await _partitions(consumer, topic)]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            end = await consumer.end_offsets(partitions)
            latest: dict[str, NodeObserved | None] = {}
            while [p for p in partitions if await consumer.position(p) < end[p]]:
                batches = await consumer.getmany(*partitions, timeout_ms=1000)
                for records in batches.values():
                    for record in records:
                        key = (record.key or b"").decode()
                        if not key.startswith("k8s/"):
                            continue
                        latest[key] = None if record.value is None else NodeObserved(**orjson.loads(record.value))
            return latest
        finally:
            await consumer.stop()

    return asyncio.run(go())


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[Any]:
    from aiokafka import TopicPartition

    numbers = consumer.partitions_for_topic(topic)
    if not numbers:
        await consumer._client.force_metadata_update()  # noqa: SLF001 - the topic was just created
        numbers = consumer.partitions_for_topic(topic) or set()
    return [TopicPartition(topic, n) for n in sorted(numbers)]


def request_taints(bootstrap: str, topic: str, wish: NodeTaintsRequested) -> None:
    """What the throttler does: the latest wish for a node's Stoker taints, keyed by the node."""

    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(topic, wish.model_dump_json().encode(), key=wish.node.encode())
        finally:
            await producer.stop()

    asyncio.run(go())


@pytest.fixture
def nodewatch(stoker_settings: CommonSettings, nodewatch_kubeconfig: Path) -> Any:
    service = ServiceProcess(
        "services.nodewatch",
        "nodewatch",
        stoker_settings,
        {
            "KUBECONFIG": str(nodewatch_kubeconfig),
            "KUBERNETES_SERVICE_HOST": "",  # not in a pod: the kubeconfig, not the in-cluster config
            "STOKER_NODEWATCH_WATCH_TIMEOUT_S": "5",  # several watch restarts within the test
            "STOKER_NODEWATCH_RETRY_S": "1",
        },
    )
    try:
        service.wait_ready(timeout_s=60)
        yield service
    finally:
        service.stop()


def test_nodes_show_up_on_the_node_topic_and_requested_taints_land_on_them(
    cluster: Cluster, stoker_settings: CommonSettings, nodewatch: ServiceProcess
) -> None:
    bootstrap, topics = stoker_settings.bootstrap, stoker_settings.topics
    suffix = uuid.uuid4().hex[:6]
    runtime, isolated, manager = f"rt-{suffix}", f"iso-{suffix}", f"mgmt-{suffix}"
    dedicated = {"key": "stoker.io/dedicated", "value": "runtime", "effect": "NoSchedule"}
    make_node(cluster, runtime, {"stoker.io/role": "runtime"}, [dedicated])
    make_node(cluster, isolated, {"stoker.io/role": "isolated"})
    make_node(cluster, manager, {"stoker.io/role": "management"})  # outside the chart's selector

    def seen(name: str, check: Any = lambda r: True) -> NodeObserved:
        def probe() -> NodeObserved | None:
            record = read_latest(bootstrap, topics.node).get(observed_key(name))
            return record if record is not None and check(record) else None

        return assert_eventually(
            probe, timeout_s=60, interval_s=0.5, message=f"{name} on {topics.node}\n{nodewatch.log()}"
        )

    # The Node is created, then its status (allocatable) is written: nodewatch may publish between the two.
    record = seen(runtime, lambda r: r.capacity.cpu_millis == 3500)
    assert record.labels == {"kubernetes.io/hostname": runtime, "stoker.io/role": "runtime"}
    # The server's TaintNodesByCondition admission puts not-ready on every new Node; the node
    # lifecycle controller (not running here) would lift it once the Node is Ready.
    assert [(t.key, t.value, t.effect) for t in record.taints] == [
        ("stoker.io/dedicated", "runtime", "NoSchedule"),
        ("node.kubernetes.io/not-ready", "", "NoSchedule"),
    ]
    assert (record.capacity.cpu_millis, record.capacity.memory_mb, record.capacity.max_instances) == (3500, 7680, 6)
    assert record.ready and not record.unschedulable
    assert seen(isolated).labels["stoker.io/role"] == "isolated"

    # Relabelled and retainted by someone else (an operator): the new facts follow.
    patch = {"metadata": {"labels": {"topology.kubernetes.io/zone": "z1"}}}
    assert cluster.request("PATCH", f"/api/v1/nodes/{runtime}", patch, content_type=MERGE_PATCH)[0] == 200
    maintenance = {"key": "example.com/maintenance", "effect": "NoSchedule"}
    current = node(cluster, runtime)["spec"]["taints"]
    status, _ = cluster.request(
        "PATCH", f"/api/v1/nodes/{runtime}", {"spec": {"taints": [*current, maintenance]}}, content_type=MERGE_PATCH
    )
    assert status == 200
    record = seen(runtime, lambda r: "topology.kubernetes.io/zone" in r.labels and len(r.taints) == 3)
    assert record.labels["topology.kubernetes.io/zone"] == "z1"
    assert ("example.com/maintenance", "", "NoSchedule") in [(t.key, t.value, t.effect) for t in record.taints]

    # Stoker asks for a taint (as the throttler does): it lands on the Node, the others stay.
    throttled = Taint(key="stoker.io/throttled", value="cpu", effect="PreferNoSchedule")
    request_taints(
        bootstrap,
        topics.node_taint,
        NodeTaintsRequested(node=runtime, taints=[throttled], keys=["stoker.io/throttled"], reason="test"),
    )

    def node_taints() -> list[tuple[str, str, str]]:
        return [(t["key"], t.get("value", ""), t["effect"]) for t in node(cluster, runtime)["spec"].get("taints", [])]

    assert_eventually(
        lambda: ("stoker.io/throttled", "cpu", "PreferNoSchedule") in node_taints(),
        timeout_s=60,
        interval_s=0.5,
        message=f"the requested taint on {runtime}\n{nodewatch.log()}",
    )
    assert ("stoker.io/dedicated", "runtime", "NoSchedule") in node_taints()
    assert ("example.com/maintenance", "", "NoSchedule") in node_taints()
    seen(runtime, lambda r: "stoker.io/throttled" in [t.key for t in r.taints])

    # The wish withdrawn by an empty one for the same key: the taint goes, the others stay.
    request_taints(
        bootstrap, topics.node_taint, NodeTaintsRequested(node=runtime, taints=[], keys=["stoker.io/throttled"])
    )
    assert_eventually(
        lambda: "stoker.io/throttled" not in [key for key, _, _ in node_taints()],
        timeout_s=60,
        interval_s=0.5,
        message=f"the taint removed from {runtime}\n{nodewatch.log()}",
    )
    assert len(node_taints()) == 3  # dedicated, not-ready, maintenance

    # Moved out of the selection, and deleted: tombstones.
    patch = {"metadata": {"labels": {"stoker.io/role": "management"}}}
    assert cluster.request("PATCH", f"/api/v1/nodes/{isolated}", patch, content_type=MERGE_PATCH)[0] == 200
    assert cluster.request("DELETE", f"/api/v1/nodes/{runtime}")[0] == 200

    def gone() -> bool:
        latest = read_latest(bootstrap, topics.node)
        return (
            latest.get(observed_key(isolated), "absent") is None and latest.get(observed_key(runtime), "absent") is None
        )

    assert_eventually(gone, timeout_s=60, interval_s=0.5, message=f"tombstones\n{nodewatch.log()}")
    assert observed_key(manager) not in read_latest(bootstrap, topics.node)  # never selected
    assert nodewatch.proc.poll() is None, nodewatch.log()


def test_a_stale_taint_patch_is_refused_by_the_real_server(cluster: Cluster) -> None:
    """The JSON patch nodewatch sends tests the taints it replaces: a changed node refuses it."""
    name = f"stale-{uuid.uuid4().hex[:6]}"
    make_node(
        cluster,
        name,
        {"stoker.io/role": "runtime"},
        [{"key": "stoker.io/dedicated", "value": "runtime", "effect": "NoSchedule"}],
    )
    current = node(cluster, name)["spec"]["taints"]
    probe = Taint(key="stoker.io/probe", value="x", effect="NoSchedule")
    stale = taint_patch([{"key": "stoker.io/not-there", "effect": "NoSchedule"}], [probe])
    status, answer = cluster.request("PATCH", f"/api/v1/nodes/{name}", stale, content_type=JSON_PATCH)
    assert status == 422, answer
    assert node(cluster, name)["spec"]["taints"] == current
    status, answer = cluster.request(
        "PATCH", f"/api/v1/nodes/{name}", taint_patch(current, [probe]), content_type=JSON_PATCH
    )
    assert status == 200, answer
    keys = ["stoker.io/dedicated", "node.kubernetes.io/not-ready", "stoker.io/probe"]  # not-ready: admission's
    assert [t["key"] for t in answer["spec"]["taints"]] == keys
    assert cluster.request("DELETE", f"/api/v1/nodes/{name}")[0] == 200


# --------------------------------------------------------------------------- RBAC: enough, and no more


def test_the_nodewatch_account_may_do_what_nodewatch_does(cluster: Cluster, nodewatch_token: str) -> None:
    name = f"rbac-{uuid.uuid4().hex[:6]}"
    make_node(cluster, name, {"stoker.io/role": "runtime"})
    allowed = [
        ("GET", "/api/v1/nodes?labelSelector=stoker.io%2Frole+in+%28runtime%2Cisolated%29", None, "application/json"),
        ("GET", f"/api/v1/nodes/{name}", None, "application/json"),
        ("GET", "/api/v1/nodes?watch=1&timeoutSeconds=1", None, "application/json"),
        (
            "PATCH",
            f"/api/v1/nodes/{name}",
            taint_patch(None, [Taint(key="stoker.io/x", effect="NoSchedule")]),
            JSON_PATCH,
        ),
    ]
    for method, path, body, kind in allowed:
        if "watch=1" in path:
            # a watch answers with a stream of events, not one JSON document: only the status counts
            status = _status_only(cluster, method, path, nodewatch_token)
        else:
            status, _ = cluster.request(method, path, body, token=nodewatch_token, content_type=kind)
        assert status == 200, (method, path, status)


def _status_only(cluster: Cluster, method: str, path: str, token: str) -> int:
    import ssl
    import urllib.request

    req = urllib.request.Request(cluster.server + path, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    context = ssl.create_default_context(cafile=str(cluster.ca_file))
    with urllib.request.urlopen(req, context=context, timeout=30) as response:
        response.read()
        return int(response.status)


def test_the_nodewatch_account_may_do_nothing_else(cluster: Cluster, nodewatch_token: str) -> None:
    name = f"rbac-{uuid.uuid4().hex[:6]}"
    make_node(cluster, name, {"stoker.io/role": "runtime"})
    refused = [
        ("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"{name}-new"}}),
        ("DELETE", f"/api/v1/nodes/{name}", None),
        ("PATCH", f"/api/v1/nodes/{name}/status", {"status": {"allocatable": {"cpu": "64"}}}),  # the kubelet's
        ("GET", "/api/v1/pods", None),
        ("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets", None),
        ("GET", f"/api/v1/namespaces/{NAMESPACE}/configmaps", None),
        (
            "POST",
            f"/api/v1/namespaces/{NAMESPACE}/pods",
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}},
        ),
        ("GET", "/apis/apps/v1/daemonsets", None),
        ("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles", None),
    ]
    for method, path, body in refused:
        kind = MERGE_PATCH if method == "PATCH" else "application/json"
        status, answer = cluster.request(method, path, body, token=nodewatch_token, content_type=kind)
        assert status == 403, (method, path, status, answer)
        assert "system:serviceaccount:stoker:stoker-nodewatch" in answer["message"]
    assert "stoker.io/role" in node(cluster, name)["metadata"]["labels"]  # still there, unchanged


@pytest.mark.parametrize("account", ["stoker", "stoker-agent"])
def test_the_other_accounts_have_no_api_rights(cluster: Cluster, applied: str, account: str) -> None:
    token = cluster.kubectl("-n", NAMESPACE, "create", "token", account, "--duration=10m").strip()
    for path in ("/api/v1/nodes", f"/api/v1/namespaces/{NAMESPACE}/configmaps", "/api/v1/pods"):
        status, answer = cluster.request("GET", path, token=token)
        assert status == 403, (account, path, answer)
        assert f"system:serviceaccount:stoker:{account}" in answer["message"]
