"""Every committed manifest applied to a real API server, and what it takes for the agents to be admitted.

The server stores and admits; nothing runs the pods (no kubelet). Admission is what a manifest
meets first on a real cluster: schema and field validation, the ServiceAccount admission plugin,
Pod Security Admission at the namespace's level, and the server's own ``--allow-privileged``.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from tests.k8s.cluster import Cluster, start_cluster
from tests.k8s.conftest import MANIFESTS, NAMESPACE

COMMITTED = MANIFESTS / "stoker.yaml"
PLURAL = {
    "Namespace": "namespaces",
    "ServiceAccount": "serviceaccounts",
    "ConfigMap": "configmaps",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "ClusterRole": "clusterroles.rbac.authorization.k8s.io",
    "ClusterRoleBinding": "clusterrolebindings.rbac.authorization.k8s.io",
    "Service": "services",
    "DaemonSet": "daemonsets.apps",
    "Deployment": "deployments.apps",
    "Job": "jobs.batch",
}


def committed() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(COMMITTED.read_text()) if d]


def pod_of(workload: dict[str, Any], name: str) -> dict[str, Any]:
    """The Pod a controller would make from ``workload``'s template (no kubelet will run it)."""
    template = copy.deepcopy(workload["spec"]["template"])
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **template["metadata"]},
        "spec": template["spec"],
    }


def test_every_manifest_is_applied_for_real(cluster: Cluster, applied: str) -> None:
    docs = committed()
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        assert kind in PLURAL, f"add {kind} to PLURAL"
        scope = ["-n", doc["metadata"]["namespace"]] if "namespace" in doc["metadata"] else []
        stored = yaml.safe_load(
            cluster.kubectl("get", *scope, PLURAL[kind], name, "-o", "yaml", "--show-managed-fields")
        )
        # Stored as written, by this apply: the server kept the labels, and our field manager owns them.
        assert doc["metadata"].get("labels", {}).items() <= stored["metadata"].get("labels", {}).items()
        managers = {entry["manager"] for entry in stored["metadata"]["managedFields"]}
        assert "stoker-tests" in managers, (kind, name, managers)
    assert len(docs) == applied.count("serverside-applied"), applied


def test_the_agents_pods_are_admitted_in_the_stoker_namespace(cluster: Cluster, applied: str) -> None:
    namespace = yaml.safe_load(cluster.kubectl("get", "namespace", NAMESPACE, "-o", "yaml"))
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    workloads = {d["metadata"]["name"]: d for d in committed() if d["kind"] in ("DaemonSet", "Deployment", "Job")}
    for name, workload in workloads.items():
        pod = pod_of(workload, f"{name}-probe")
        status, body = cluster.request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", pod)
        assert status == 201, (name, body)
        security = body["spec"]["containers"][0].get("securityContext") or {}
        assert security.get("privileged", False) is name.startswith("stoker-agent-"), name
        status, _ = cluster.request("DELETE", f"/api/v1/namespaces/{NAMESPACE}/pods/{name}-probe")
        assert status == 200


def test_outside_a_privileged_namespace_only_the_agents_are_refused(cluster: Cluster, applied: str) -> None:
    """Why the chart labels its namespace: at the `baseline` level the agents are refused, the rest admitted."""
    strict = "stoker-baseline"
    cluster.kubectl("create", "namespace", strict)
    cluster.kubectl("label", "namespace", strict, "pod-security.kubernetes.io/enforce=baseline")
    for account in ("stoker", "stoker-agent", "stoker-nodewatch"):
        cluster.kubectl("-n", strict, "create", "serviceaccount", account)
    for doc in committed():
        if doc["kind"] not in ("DaemonSet", "Deployment", "Job"):
            continue
        name = doc["metadata"]["name"]
        status, body = cluster.request("POST", f"/api/v1/namespaces/{strict}/pods?dryRun=All", pod_of(doc, name))
        if name.startswith("stoker-agent-"):
            assert status == 403, (name, body)
            assert 'violates PodSecurity "baseline:latest"' in body["message"]
            assert "privileged" in body["message"]
        else:
            assert status == 201, (name, body)


def test_a_server_that_refuses_privileged_containers_refuses_the_agents(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Why the cluster must run kube-apiserver with --allow-privileged=true (deploy/README.md):
    without it both agent DaemonSets are refused, and nothing else is."""
    bare = start_cluster(tmp_path_factory.mktemp("kube-bare"), allow_privileged=False)
    try:
        done = bare.kubectl("apply", "--server-side", "-f", str(MANIFESTS), check=False)
        refused = [line for line in done.splitlines() if "privileged: Forbidden" in line]
        assert len(refused) == 2, done
        assert all("stoker-agent-" in line for line in refused), done
        assert "disallowed by cluster policy" in done
        assert done.count("serverside-applied") == len(committed()) - 2, done
    finally:
        bare.stop()
