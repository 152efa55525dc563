"""The committed manifests (deploy/k8s/, `helm template` output of the chart): schemas and the cluster shape.

tests/k8s/test_chart.py checks that they are what the real Helm renders from the chart, and
tests/k8s/test_apply.py that a real API server accepts every one of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "deploy" / "k8s" / "stoker.yaml"
LATEST = kubernetes_validate.utils.latest_version()
# The newest schemas kubernetes-validate ships, and an older release still common in clusters.
VERSIONS = [LATEST, "1.30.0"]
MANAGEMENT = ["gateway", "console", "dispatcher", "poolmgr", "builder", "throttler", "workflow", "trigger", "nodewatch"]
# The order Helm sorts rendered objects in (pkg/release/util InstallOrder): one `kubectl apply` of
# the file then creates each object after what it refers to.
HELM_INSTALL_ORDER = [
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange", "PodSecurityPolicy",
    "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList", "ConfigMap", "StorageClass",
    "PersistentVolume", "PersistentVolumeClaim", "CustomResourceDefinition", "ClusterRole",
    "ClusterRoleList", "ClusterRoleBinding", "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding",
    "RoleBindingList", "Service", "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress", "APIService",
]  # fmt: skip


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(doc: dict[str, Any]) -> dict[str, Any]:
    (only,) = doc["spec"]["template"]["spec"]["containers"]
    return only


def env_of(doc: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(doc).get("env", [])}


@pytest.fixture(scope="module")
def committed() -> list[dict[str, Any]]:
    return documents(COMMITTED.read_text())


@pytest.mark.parametrize("version", VERSIONS)
def test_every_committed_manifest_validates_strictly(version: str) -> None:
    docs = documents(COMMITTED.read_text())
    assert len(docs) >= 15
    for doc in docs:
        validated = kubernetes_validate.validate(doc, version, strict=True)
        assert validated == kubernetes_validate.utils.major_minor(version)


def test_strict_validation_is_not_vacuous() -> None:
    deployment = by_kind(documents(COMMITTED.read_text()), "Deployment")["stoker-gateway"]
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, LATEST, strict=True)
    deployment["spec"]["replicas"] = 1
    kubernetes_validate.validate(deployment, LATEST, strict=True)
    deployment["spec"]["replica"] = 2  # a typo: strict schemas refuse unknown fields
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, LATEST, strict=True)


# --------------------------------------------------------------------------- the cluster shape


def test_management_services_run_on_management_nodes(committed: list[dict[str, Any]]) -> None:
    deployments = by_kind(committed, "Deployment")
    assert sorted(deployments) == sorted(f"stoker-{s}" for s in MANAGEMENT)
    for service in MANAGEMENT:
        d = deployments[f"stoker-{service}"]
        pod = d["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"stoker.io/role": "management"}
        assert container(d)["command"] == ["python", "-m", f"services.{service}"]
        assert container(d)["envFrom"] == [{"configMapRef": {"name": "stoker-config"}}]
        assert not container(d)["securityContext"].get("privileged")
        assert container(d)["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert container(d)["resources"]["requests"]
        assert container(d)["readinessProbe"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for singleton in ("poolmgr", "nodewatch", "dispatcher"):
        assert deployments[f"stoker-{singleton}"]["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("pool", ["runtime", "isolated"])
def test_agents_are_daemonsets_on_their_tainted_nodes(committed: list[dict[str, Any]], pool: str) -> None:
    ds = by_kind(committed, "DaemonSet")[f"stoker-agent-{pool}"]
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"stoker.io/role": pool}
    assert pod["tolerations"] == [
        {"key": "stoker.io/dedicated", "operator": "Equal", "value": pool, "effect": "NoSchedule"}
    ]
    agent = container(ds)
    assert agent["command"] == ["python", "-m", "services.agent"]
    env = env_of(ds)
    assert env["STOKER_NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["STOKER_NODE_LABELS"] == f"stoker.io/role={pool}"
    assert env["STOKER_NODE_TAINTS"] == f"stoker.io/dedicated={pool}:NoSchedule"
    assert env["STOKER_CGROUPS"] == "on"
    assert int(env["STOKER_MAX_INSTANCES"]) > 0 and int(env["STOKER_POOL_SIZE"]) >= 0
    # root and privileged: cgroups and the instance sandbox (namespaces, mounts, a uid per instance)
    assert agent["securityContext"] == {"privileged": True, "runAsUser": 0, "runAsNonRoot": False}
    assert pod["serviceAccountName"] == "stoker-agent" and pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert mounts["/var/lib/stoker/artifacts"]["readOnly"] is True
    # the agents' labels/taints parse the way the agent parses them
    from services.agent.settings import parse_labels, parse_taints

    assert parse_labels(env["STOKER_NODE_LABELS"]) == {"stoker.io/role": pool}
    (taint,) = parse_taints(env["STOKER_NODE_TAINTS"])
    assert (taint.key, taint.value, taint.effect) == ("stoker.io/dedicated", pool, "NoSchedule")


def test_the_two_agent_daemonsets_select_disjoint_pods(committed: list[dict[str, Any]]) -> None:
    runtime, isolated = (by_kind(committed, "DaemonSet")[f"stoker-agent-{p}"] for p in ("runtime", "isolated"))
    for ds in (runtime, isolated):
        assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert runtime["spec"]["selector"]["matchLabels"] != isolated["spec"]["selector"]["matchLabels"]
    assert not (
        runtime["spec"]["selector"]["matchLabels"].items() <= isolated["spec"]["template"]["metadata"]["labels"].items()
    )


def test_only_nodewatch_may_use_the_api(committed: list[dict[str, Any]]) -> None:
    role = by_kind(committed, "ClusterRole")["stoker-nodewatch"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch", "patch"]}]
    binding = by_kind(committed, "ClusterRoleBinding")["stoker-nodewatch"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "stoker-nodewatch",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "stoker-nodewatch", "namespace": "stoker"}]
    accounts = by_kind(committed, "ServiceAccount")
    assert accounts["stoker"]["automountServiceAccountToken"] is False
    assert accounts["stoker-agent"]["automountServiceAccountToken"] is False
    assert "automountServiceAccountToken" not in accounts["stoker-nodewatch"]
    assert not by_kind(committed, "Role") and not by_kind(committed, "RoleBinding")
    for kind in ("Deployment", "DaemonSet", "Job"):
        for name, doc in by_kind(committed, kind).items():
            pod = doc["spec"]["template"]["spec"]
            assert pod["serviceAccountName"] in accounts
            token = pod.get("automountServiceAccountToken", True)
            assert token is (name == "stoker-nodewatch"), name


def test_gateway_service(committed: list[dict[str, Any]]) -> None:
    service = by_kind(committed, "Service")["stoker-gateway"]
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    gateway = by_kind(committed, "Deployment")["stoker-gateway"]
    assert service["spec"]["selector"].items() <= gateway["spec"]["template"]["metadata"]["labels"].items()
    assert container(gateway)["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    env = env_of(gateway)
    assert env["STOKER_HTTP_HOST"] == "0.0.0.0" and env["STOKER_HTTP_PORT"] == "8080"
    assert env["STOKER_WEBHOOK_SECRET"] == {
        "secretKeyRef": {"name": "stoker-webhook", "key": "secret", "optional": True}
    }
    assert container(gateway)["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


def test_shared_settings_and_no_committed_secret(committed: list[dict[str, Any]]) -> None:
    config = by_kind(committed, "ConfigMap")["stoker-config"]["data"]
    assert config == {
        "STOKER_BOOTSTRAP": "kafka.kafka.svc.cluster.local:9092",
        "STOKER_TOPIC_PREFIX": "stoker.",
        "STOKER_HOME": "/var/lib/stoker",
        "STOKER_LOG_LEVEL": "INFO",
    }
    assert not by_kind(committed, "Secret")
    values = yaml.safe_load((REPO / "deploy/helm/stoker/values.yaml").read_text())
    assert values["webhookSecret"]["value"] == ""  # rendered into deploy/k8s: must stay empty


def test_artifacts_are_shared_between_builder_and_agents(committed: list[dict[str, Any]]) -> None:
    claim = by_kind(committed, "PersistentVolumeClaim")["stoker-artifacts"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    users = [by_kind(committed, "Deployment")["stoker-builder"], *by_kind(committed, "DaemonSet").values()]
    for doc in users:
        volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
        assert volumes["artifacts"]["persistentVolumeClaim"] == {"claimName": "stoker-artifacts"}
        mounts = {m["name"]: m["mountPath"] for m in container(doc)["volumeMounts"]}
        # artifact URIs are absolute file paths: the same place in every pod
        assert mounts["artifacts"] == "/var/lib/stoker/artifacts"


def test_the_namespace_admits_the_privileged_agents(committed: list[dict[str, Any]]) -> None:
    labels = by_kind(committed, "Namespace")["stoker"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


def test_manifests_come_in_install_order(committed: list[dict[str, Any]]) -> None:
    kinds = [d["kind"] for d in committed]
    assert kinds[0] == "Namespace"
    order = [HELM_INSTALL_ORDER.index(k) for k in kinds]
    assert order == sorted(order)
    assert kinds.index("ConfigMap") < kinds.index("Deployment")


def test_topics_job(committed: list[dict[str, Any]]) -> None:
    job = by_kind(committed, "Job")["stoker-topics"]
    assert container(job)["command"] == ["python", "-m", "services.cli.topics", "--nodes", "0"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"


def test_values_file_explains_the_agents_privileges() -> None:
    text = (REPO / "deploy/helm/stoker/values.yaml").read_text()
    agent = text[text.index("\nagent:") :]
    assert "Why privileged" in agent and "cgroup" in agent and "hostCgroupfs" in agent
