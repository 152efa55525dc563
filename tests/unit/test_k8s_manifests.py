"""The Helm chart, its renderer, and the committed manifests (deploy/k8s/) they must equal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deploy import render
from deploy.render import Renderer, TemplateError, documents, manifest_text, render_chart

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "deploy" / "k8s" / "stoker.yaml"
LATEST = kubernetes_validate.utils.latest_version()
# The newest schemas kubernetes-validate ships, and an older release still common in clusters.
VERSIONS = [LATEST, "1.30.0"]
MANAGEMENT = ["gateway", "dispatcher", "poolmgr", "builder", "throttler", "workflow", "nodewatch"]


def manifests(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return documents(manifest_text(render_chart(values=values)))


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(doc: dict[str, Any]) -> dict[str, Any]:
    (only,) = doc["spec"]["template"]["spec"]["containers"]
    return only


def env_of(doc: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(doc).get("env", [])}


# --------------------------------------------------------------------------- committed == rendered


def test_committed_manifests_match_a_fresh_render(tmp_path: Path) -> None:
    out = tmp_path / "stoker.yaml"
    assert render.main(["--out", str(out)]) == 0
    assert COMMITTED.read_text() == out.read_text(), "deploy/k8s is stale: run `python -m deploy.render`"
    assert render.main(["--check"]) == 0
    assert sorted(p.name for p in COMMITTED.parent.iterdir()) == ["stoker.yaml"]


def test_check_fails_on_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "stoker.yaml"
    stale.write_text(COMMITTED.read_text().replace("replicas: 1", "replicas: 3", 1))
    assert render.main(["--check", "--out", str(stale)]) == 1
    assert "is stale" in capsys.readouterr().err


# --------------------------------------------------------------------------- schema validation


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


@pytest.mark.parametrize("name", list(VARIANTS))
def test_rendered_variants_validate(name: str) -> None:
    for doc in manifests(VARIANTS[name]):
        kubernetes_validate.validate(doc, LATEST, strict=True)


def test_variants_render_what_they_say() -> None:
    assert "stoker-agent-isolated" not in by_kind(manifests(VARIANTS["no isolation pool"]), "DaemonSet")

    agent = by_kind(manifests(VARIANTS["host cgroupfs"]), "DaemonSet")["stoker-agent-runtime"]
    volumes = {v["name"]: v for v in agent["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cgroupfs"]["hostPath"] == {"path": "/sys/fs/cgroup", "type": "Directory"}
    mounts = {m["name"]: m for m in container(agent)["volumeMounts"]}
    assert mounts["cgroupfs"]["mountPath"] == "/sys/fs/cgroup" and not mounts["cgroupfs"].get("readOnly")

    (secret,) = by_kind(manifests(VARIANTS["chart-made secret"]), "Secret").values()
    assert secret["metadata"]["name"] == "stoker-webhook" and secret["data"] == {"secret": "czNjcmV0"}

    kinds = {d["kind"] for d in manifests(VARIANTS["existing claim, no job, no namespace"])}
    assert not kinds & {"PersistentVolumeClaim", "Job", "Namespace"}

    docs = manifests(VARIANTS["tracing, extra settings, storage class, tolerations"])
    config = by_kind(docs, "ConfigMap")["stoker-config"]["data"]
    assert config["STOKER_OTLP_ENDPOINT"] == "http://otel:4318"
    assert config["STOKER_KEEPALIVE"] == "fixed" and config["STOKER_NODE_TIMEOUT_S"] == "5"
    assert by_kind(docs, "PersistentVolumeClaim")["stoker-artifacts"]["spec"]["storageClassName"] == "nfs"
    gateway = by_kind(docs, "Deployment")["stoker-gateway"]
    assert gateway["spec"]["replicas"] == 3
    assert gateway["spec"]["template"]["spec"]["tolerations"][0]["key"] == "dedicated"
    assert by_kind(docs, "Service")["stoker-gateway"]["spec"]["type"] == "LoadBalancer"
    assert env_of(by_kind(docs, "Deployment")["stoker-builder"])["STOKER_PIP_ARGS"].startswith("--index-url")


def test_the_external_kafka_is_required() -> None:
    with pytest.raises(TemplateError, match="kafka.bootstrap"):
        manifests({"kafka": {"bootstrap": ""}})


def test_release_name_and_namespace() -> None:
    docs = documents(manifest_text(render_chart(release="fn", namespace="faas")))
    assert by_kind(docs, "Namespace").keys() == {"faas"}
    assert "fn-gateway" in by_kind(docs, "Deployment")
    binding = by_kind(docs, "ClusterRoleBinding")["fn-nodewatch"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "fn-nodewatch", "namespace": "faas"}]
    assert all(d["metadata"].get("namespace") in (None, "faas") for d in docs)


# --------------------------------------------------------------------------- the cluster shape


@pytest.fixture(scope="module")
def committed() -> list[dict[str, Any]]:
    return documents(COMMITTED.read_text())


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
    order = [render.INSTALL_ORDER.index(k) for k in kinds]
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


# --------------------------------------------------------------------------- the renderer itself


def tpl(source: str, dot: Any = None, defines: str = "") -> str:
    renderer = Renderer()
    if defines:
        renderer.parse(defines, "_helpers.tpl")
    return renderer.render(renderer.parse(source, "t.yaml"), dot if dot is not None else {})


def test_fields_variables_and_trimming() -> None:
    dot = {"Values": {"a": {"b": "x"}, "n": 3}, "Release": {"Name": "r"}}
    assert tpl("{{ .Values.a.b }}-{{ .Release.Name }}", dot) == "x-r"
    assert tpl("a  {{- .Values.n -}}  \n b", dot) == "a3b"
    assert tpl("a\n{{- /* a comment */ -}}\nb", dot) == "ab"
    assert tpl("{{/* only */}}x", dot) == "x"
    assert tpl("{{ $v := .Values.a }}{{ $v.b }}{{ $.Release.Name }}", dot) == "xr"
    assert tpl('{{ "}}" }}', dot) == "}}"
    assert tpl("{{ `raw \\n` }}", dot) == "raw \\n"
    assert tpl("{{ .Values.n }} {{ 2.5 }} {{ true }}", dot) == "3 2.5 true"


def test_conditionals() -> None:
    source = "{{ if .a }}A{{ else if .b }}B{{ else if .c }}C{{ else }}D{{ end }}"
    assert [tpl(source, d) for d in ({"a": 1}, {"b": [1]}, {"c": "x"}, {"a": 0, "b": [], "c": ""})] == list("ABCD")
    assert tpl("{{ if and .a (not .b) }}y{{ end }}", {"a": True, "b": False}) == "y"
    assert tpl("{{ if or .a .b }}y{{ else }}n{{ end }}", {"a": {}, "b": None}) == "n"
    assert tpl('{{ if eq .a "x" "y" }}in{{ end }}{{ if ne .a "x" }}!{{ end }}', {"a": "y"}) == "in!"
    assert tpl("{{ if .missing }}y{{ else }}n{{ end }}", {}) == "n"
    assert tpl("{{ with .a }}{{ .b }}{{ else }}none{{ end }}", {"a": {"b": "in"}}) == "in"
    assert tpl("{{ with .a }}{{ .b }}{{ else }}none{{ end }}", {"a": {}}) == "none"


def test_range_over_lists_and_maps() -> None:
    dot = {"l": ["a", "b"], "m": {"z": 1, "a": 2}, "root": "R"}
    assert tpl("{{ range .l }}[{{ . }}{{ $.root }}]{{ end }}", dot) == "[aR][bR]"
    assert tpl("{{ range $i, $v := .l }}{{ $i }}={{ $v }};{{ end }}", dot) == "0=a;1=b;"
    assert tpl("{{ range $k, $v := .m }}{{ $k }}={{ $v }};{{ end }}", dot) == "a=2;z=1;"  # sorted, like Go
    assert tpl("{{ range $v := .m }}{{ $v }}{{ end }}", dot) == "21"
    assert tpl("{{ range .none }}x{{ else }}empty{{ end }}", dot) == "empty"


def test_define_include_and_functions() -> None:
    helpers = '{{- define "lbl" -}}\nname: {{ .n }}\nteam: {{ .t | default "core" }}\n{{- end }}'
    out = tpl('labels:\n  {{- include "lbl" (dict "n" .name) | nindent 2 }}\n', {"name": "x"}, helpers)
    assert out == "labels:\n  name: x\n  team: core\n"
    assert tpl("{{ .v | quote }} {{ 8080 | quote }}", {"v": 'a"b'}) == '"a\\"b" "8080"'
    assert tpl("{{ .s | b64enc }}", {"s": "s3cret"}) == "czNjcmV0"
    assert tpl('{{ "Stoker-ABCdef" | trunc 7 | trimSuffix "-" | lower }}', {}) == "stoker"
    assert tpl("{{ .v | indent 2 }}", {"v": "a\nb"}) == "  a\n  b"
    assert tpl('{{ required "need x" .x }}', {"x": "ok"}) == "ok"
    assert tpl("{{ if empty .l }}e{{ end }}{{ range list 1 2 }}{{ . }}{{ end }}", {"l": []}) == "e12"


def test_to_yaml_matches_helm_layout() -> None:
    value = {"b": {"requests": {"cpu": "1", "memory": "1Gi"}}, "a": [{"key": "x", "operator": "Exists"}], "n": 2}
    out = tpl("x:\n  {{- toYaml .v | nindent 2 }}\n", {"v": value})
    assert yaml.safe_load(out) == {"x": value}
    assert out == (
        "x:\n  a:\n  - key: x\n    operator: Exists\n  b:\n    requests:\n      cpu: '1'\n      memory: 1Gi\n  n: 2\n"
    )
    assert tpl("{{ toYaml .v }}", {"v": "plain"}) == "plain"
    assert tpl("{{ toYaml .v }}", {"v": {}}) == "{}"


@pytest.mark.parametrize(
    ("source", "dot", "message"),
    [
        ("{{ .missing }}", {}, "missing value"),
        ("{{ .a.b.c }}", {"a": {}}, "nil pointer"),
        ("{{ .a.b }}", {"a": "text"}, "cannot take"),
        ("{{ .n }}", {"n": 1000000}, "exponent"),
        ("{{ .n }}", {"n": 2.0}, "no fraction"),
        ("{{ .l }}", {"l": [1]}, "toYaml"),
        ('{{ printf "%s" .x }}', {"x": 1}, "not supported"),
        ('{{ template "x" . }}', {}, "not supported"),
        ("{{ if .a }}x", {"a": 1}, "has no end"),
        ("{{ end }}", {}, "end without"),
        ("{{ else }}", {}, "else without"),
        ("{{ .a", {}, "unclosed"),
        ('{{ include "nope" . }}', {}, "no template"),
        ('{{ required "x is required" .x }}', {}, "x is required"),
        ("{{ $nope }}", {}, "undefined variable"),
        ("{{ .a .b }}", {"a": 1, "b": 2}, "method calls"),
        ("{{ quote | .a }}", {"a": 1}, "only a function"),
        ("{{ /* not adjacent */ }}", {}, "comment must start"),
        ('{{ "\\x41" }}', {}, "escapes"),
    ],
)
def test_what_the_renderer_refuses(source: str, dot: Any, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        tpl(source, dot)


def test_values_merge_like_helm() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": {"f": 1}}
    merged = render.deep_merge(base, {"a": {"c": [3]}, "d": None, "e": {"g": 2}})
    assert merged == {"a": {"b": 1, "c": [3]}, "e": {"f": 1, "g": 2}}
    assert base["a"] == {"b": 1, "c": [1, 2]}  # untouched


def test_values_files_layer_over_the_chart(tmp_path: Path) -> None:
    extra = tmp_path / "site.yaml"
    extra.write_text("kafka:\n  bootstrap: broker-1:9092,broker-2:9092\n")
    out = tmp_path / "site-stoker.yaml"
    assert render.main(["-f", str(extra), "--out", str(out)]) == 0
    config = by_kind(documents(out.read_text()), "ConfigMap")["stoker-config"]["data"]
    assert config["STOKER_BOOTSTRAP"] == "broker-1:9092,broker-2:9092"
