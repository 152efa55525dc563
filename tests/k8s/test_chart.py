"""The chart through the real Helm: the committed manifests are its output, `helm lint` passes, and
the variants the values offer render into objects a real API server accepts."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.helpers import REPO_ROOT
from tests.k8s.cluster import Cluster, helm
from tests.k8s.conftest import MANIFESTS, NAMESPACE

CHART = "deploy/helm/stoker"
COMMITTED = MANIFESTS / "stoker.yaml"


def render(*args: str, release: str = "stoker", namespace: str = NAMESPACE) -> str:
    done = helm("template", release, CHART, "--namespace", namespace, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(doc: dict[str, Any]) -> dict[str, Any]:
    (only,) = doc["spec"]["template"]["spec"]["containers"]
    return only


def test_the_committed_manifests_are_what_helm_renders() -> None:
    assert COMMITTED.read_text() == render(), (
        "deploy/k8s/stoker.yaml is not the chart's `helm template` output: run `make manifests` and commit it"
    )
    assert sorted(p.name for p in MANIFESTS.iterdir()) == ["stoker.yaml"]  # nothing else gets applied


def test_helm_lint_passes_strictly() -> None:
    done = helm("lint", "--strict", CHART)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in done.stdout


def test_helm_lint_is_not_vacuous(tmp_path: Path) -> None:
    broken = tmp_path / "stoker"
    shutil.copytree(REPO_ROOT / CHART, broken)
    chart = broken / "Chart.yaml"
    chart.write_text("".join(line for line in chart.read_text().splitlines(True) if not line.startswith("version:")))
    done = helm("lint", "--strict", str(broken))
    assert done.returncode != 0
    assert "version is required" in done.stdout + done.stderr


VARIANTS: dict[str, dict[str, Any]] = {
    "no isolation pool": {"agent": {"pools": {"isolated": {"enabled": False}}}},
    "host cgroupfs": {"agent": {"hostCgroupfs": True}},
    "chart-made secret": {"webhookSecret": {"value": "s3cret"}},
    "existing claim, no job, no namespace": {
        "artifacts": {"create": False},
        "topicsJob": {"enabled": False},
        "createNamespace": False,
    },
    "tracing, extra settings, storage class, tolerations": {
        "otlpEndpoint": "http://otel:4318",
        "config": {"STOKER_KEEPALIVE": "fixed", "STOKER_NODE_TIMEOUT_S": "5"},
        "artifacts": {"storageClassName": "nfs"},
        "management": {"tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]},
        "builder": {"pipArgs": "--index-url https://pypi.internal/simple"},
        "gateway": {"replicas": 3, "service": {"type": "LoadBalancer"}},
    },
}


def render_variant(name: str, folder: Path, release: str = "stoker", namespace: str = NAMESPACE) -> Path:
    values = folder / "values.yaml"
    values.write_text(yaml.safe_dump(VARIANTS[name]))
    out = folder / "stoker.yaml"
    out.write_text(render("-f", str(values), release=release, namespace=namespace))
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_is_applied_by_the_api_server(name: str, cluster: Cluster, tmp_path: Path) -> None:
    # A release and namespace of its own: objects of the committed release (a Job's pod template,
    # say) cannot change in place, and the variants are applied for real.
    release = f"v{list(VARIANTS).index(name)}"
    out = render_variant(name, tmp_path, release=release, namespace=release)
    for doc in documents(out.read_text()):
        kubernetes_validate.validate(doc, kubernetes_validate.utils.latest_version(), strict=True)
    if VARIANTS[name].get("createNamespace") is False:
        cluster.kubectl("create", "namespace", release)
    said = cluster.kubectl("apply", "--server-side", "--field-manager=stoker-tests", "-f", str(out))
    assert said.count("serverside-applied") == len(documents(out.read_text())), said


def test_variants_render_what_they_say(tmp_path: Path) -> None:
    def docs(name: str) -> list[dict[str, Any]]:
        folder = tmp_path / name.replace(" ", "-").replace(",", "")
        folder.mkdir()
        return documents(render_variant(name, folder).read_text())

    assert "stoker-agent-isolated" not in by_kind(docs("no isolation pool"), "DaemonSet")

    agent = by_kind(docs("host cgroupfs"), "DaemonSet")["stoker-agent-runtime"]
    volumes = {v["name"]: v for v in agent["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cgroupfs"]["hostPath"] == {"path": "/sys/fs/cgroup", "type": "Directory"}
    mounts = {m["name"]: m for m in container(agent)["volumeMounts"]}
    assert mounts["cgroupfs"]["mountPath"] == "/sys/fs/cgroup" and not mounts["cgroupfs"].get("readOnly")

    (secret,) = by_kind(docs("chart-made secret"), "Secret").values()
    assert secret["metadata"]["name"] == "stoker-webhook"
    assert base64.b64decode(secret["data"]["secret"]) == b"s3cret"

    kinds = {d["kind"] for d in docs("existing claim, no job, no namespace")}
    assert not kinds & {"PersistentVolumeClaim", "Job", "Namespace"}

    rendered = docs("tracing, extra settings, storage class, tolerations")
    config = by_kind(rendered, "ConfigMap")["stoker-config"]["data"]
    assert config["STOKER_OTLP_ENDPOINT"] == "http://otel:4318"
    assert config["STOKER_KEEPALIVE"] == "fixed" and config["STOKER_NODE_TIMEOUT_S"] == "5"
    assert by_kind(rendered, "PersistentVolumeClaim")["stoker-artifacts"]["spec"]["storageClassName"] == "nfs"
    gateway = by_kind(rendered, "Deployment")["stoker-gateway"]
    assert gateway["spec"]["replicas"] == 3
    assert gateway["spec"]["template"]["spec"]["tolerations"][0]["key"] == "dedicated"
    assert by_kind(rendered, "Service")["stoker-gateway"]["spec"]["type"] == "LoadBalancer"
    builder_env = {
        e["name"]: e.get("value") for e in container(by_kind(rendered, "Deployment")["stoker-builder"])["env"]
    }
    assert builder_env["STOKER_PIP_ARGS"].startswith("--index-url")


def test_the_external_kafka_is_required() -> None:
    done = helm("template", "stoker", CHART, "--namespace", NAMESPACE, "--set", "kafka.bootstrap=")
    assert done.returncode != 0
    assert "kafka.bootstrap (the external Kafka, host:port) is required" in done.stderr


def test_release_name_and_namespace() -> None:
    done = helm("template", "fn", CHART, "--namespace", "faas")
    assert done.returncode == 0, done.stderr
    docs = documents(done.stdout)
    assert by_kind(docs, "Namespace").keys() == {"faas"}
    assert "fn-gateway" in by_kind(docs, "Deployment")
    binding = by_kind(docs, "ClusterRoleBinding")["fn-nodewatch"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "fn-nodewatch", "namespace": "faas"}]
    assert all(d["metadata"].get("namespace") in (None, "faas") for d in docs)
