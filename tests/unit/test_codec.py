"""Unit tests of the wire contract: events.codec, the record models and the topic catalogue."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from events import (
    CodeSource,
    DeadLettered,
    DecodeError,
    EnsurePool,
    ErrorInfo,
    Execute,
    FunctionSpec,
    InstanceChanged,
    InstanceSummary,
    InvocationCompleted,
    InvocationRequested,
    NodeCapacity,
    NodeHeartbeat,
    NodeStopped,
    Recycle,
    Specialize,
    Taint,
    Timings,
    Topics,
    decode,
    encode,
)
from events.auth import AuditRecorded, TokenIssued, TokenRevoked
from events.cluster import NodeObserved, NodeTaintsRequested
from events.code import ArtifactReady, BuildFailed, BuildFinished, BuildStarted, CodeCommitted
from events.codec import MODELS, SUPPORTED_VERSIONS, from_object
from events.dispatch import InvocationQueued, InvocationSent
from events.metrics import InstanceMetrics, NodeMetrics, ThrottleDecided
from events.names import NameClaimed
from events.placement import ISOLATED_TOLERATION, RUNTIME_TOLERATION, PlacementOverride, Toleration
from events.pool import PrewarmCompleted, PrewarmRequested, PrewarmStarted, RepoConfigured
from events.triggers import TriggerFailed, TriggerFired, TriggerSpec, TriggerStatus
from events.work import Clamp, ConfigureNode
from events.workflow import RunFinished, RunStarted, StepFinished, StepSpec, StepStarted, WorkflowSpec

DIGEST = "sha256:" + "ab" * 32


def _spec(**kw) -> FunctionSpec:
    kw.setdefault("name", "hello")
    kw.setdefault("entrypoint", "handler:main")
    kw.setdefault("source", CodeSource(digest=DIGEST, uri="file:///tmp/a.zip", size=10))
    return FunctionSpec(**kw)


def _workflow() -> WorkflowSpec:
    steps = [
        StepSpec(id="a", function="f"),
        StepSpec(id="b", function="g", after=["a"], map="$.steps.a.output", max_parallel=2, retries=1, line=7),
    ]
    return WorkflowSpec(name="w", steps=steps, output="$.steps.b.output", source="steps: []", updated_ms=1)


def _samples() -> dict[str, object]:
    inv = InvocationRequested(
        id="inv-1", function="hello", payload={"a": [1, 2.5, None, "x"]}, reply_to="stoker.reply.gw", deadline_ms=123
    )
    spec = _spec(
        env={"K": "V"},
        max_invocations=5,
        max_age_s=60.0,
        node_selector={"stoker.io/role": "runtime", "zone": "eu-1"},
        tolerations=[RUNTIME_TOLERATION, Toleration(key="gpu", operator="Exists", effect="NoExecute")],
    )
    return {
        "function.spec": spec,
        "invocation.requested": inv,
        "invocation.completed": InvocationCompleted(
            id="inv-1",
            function="hello",
            status="error",
            output={"o": 1},
            error=ErrorInfo(kind="ValueError", message="bad", traceback="tb"),
            start="pool",
            timings_ms=Timings(queue=1.5, start=2.0, exec=3.0, total=7.0),
            node="n1",
            instance="i1",
            function_version="abababababab",
            attempt=2,
            logs="printed",
        ),
        "work.execute": Execute(invocation=inv, spec=spec, incarnation="inc-1", attempt=2, dispatched_ms=5),
        "dispatch.queued": InvocationQueued(invocation=inv, source_offset=7, since_ms=5, attempt=2),
        "dispatch.sent": InvocationSent(
            invocation=inv, source_offset=7, node="n1", incarnation="inc-1", attempt=2, dispatched_ms=6
        ),
        "name.claimed": NameClaimed(name="hello", kind="workflow", at_ms=9),
        "work.specialize": Specialize(spec=spec, incarnation="inc-1", count=3),
        "work.ensure-pool": EnsurePool(incarnation="inc-1", generic=4),
        "work.recycle": Recycle(incarnation="inc-1", instance="i1", function="hello", reason="idle"),
        "instance.changed": InstanceChanged(
            node="n1",
            incarnation="inc-1",
            instance="i1",
            state="ready",
            pid=42,
            function="hello",
            function_version="v",
            uses=3,
            reason="r",
            at_ms=9,
        ),
        "node.heartbeat": NodeHeartbeat(
            node="n1",
            incarnation="inc-1",
            labels={"a": "b"},
            taints=[Taint(key="stoker.io/dedicated", value="runtime", effect="NoSchedule")],
            capacity=NodeCapacity(max_instances=4, cpu_millis=1000, memory_mb=512),
            pool_target=2,
            instances=[
                InstanceSummary(
                    instance="i1", state="busy", pid=7, function="hello", function_version="v", uses=1, idle_ms=0
                )
            ],
            in_flight=1,
            unschedulable=True,
            seq=17,
            interval_ms=250,
            at_ms=11,
        ),
        "node.stopped": NodeStopped(node="n1", incarnation="inc-1", at_ms=12),
        "code.committed": CodeCommitted(
            repo="file:///r.git",
            repo_aliases=["o/r"],
            ref="refs/heads/main",
            before="a" * 40,
            after="b" * 40,
            changed_paths=["fns/x/h.py"],
            delivery_id="d-1",
            source="github",
            pushed_ms=3,
        ),
        "artifact.ready": ArtifactReady(
            function="hello",
            commit="b" * 40,
            digest="sha256:00",
            uri="file:///a.zip",
            size=10,
            build_id="b1",
            build_ms=1.5,
            log_uri="file:///l.log",
            pushed_ms=3,
            built_ms=4,
        ),
        "build.failed": BuildFailed(function="hello", commit="c", build_id="b2", reason="pip", log_uri=None, at_ms=1),
        "build.started": BuildStarted(function="hello", build_id="b1", repo="r", ref="refs/heads/main", at_ms=1),
        "build.finished": BuildFinished(function="hello", build_id="b1", status="ok", digest="sha256:00", at_ms=1),
        "prewarm.requested": PrewarmRequested(function="hello", count=2, digest="sha256:00", activate=True, at_ms=1),
        "prewarm.started": PrewarmStarted(
            function="hello",
            request=PrewarmRequested(function="hello", count=2, at_ms=1),
            target=FunctionSpec(
                name="hello", entrypoint="h:main", source=CodeSource(digest="sha256:" + "0" * 64), updated_ms=1
            ),
            wanted=2,
            holders=["i-1"],
            specialize={"runtime-0": 1},
            source_offset=7,
            at_ms=1,
        ),
        "prewarm.completed": PrewarmCompleted(function="hello", status="ready", ready=2, wanted=2, at_ms=1),
        "repo.configured": RepoConfigured(repo="file:///r.git", webhook_secret="s", at_ms=1),
        "placement.override": PlacementOverride(
            function="hello",
            node_selector={"stoker.io/role": "isolated", "zone": "eu-1"},
            tolerations=[ISOLATED_TOLERATION, Toleration(operator="Exists")],
            until_ms=99,
            reason="cpu hog",
            by="throttler",
            at_ms=14,
        ),
        "node.metrics": NodeMetrics(
            node="n1",
            incarnation="inc-1",
            interval_ms=1000,
            instances=[
                InstanceMetrics(
                    instance="i1",
                    function="hello",
                    function_version="v",
                    state="busy",
                    cpu_millis=950.5,
                    memory_mb=64.25,
                    pids=3,
                    throttled_ms=12.5,
                    cpu_quota_millis=1000,
                    clamped=True,
                )
            ],
            cpu_millis=1000.0,
            memory_mb=128.0,
            at_ms=15,
        ),
        "throttle.decided": ThrottleDecided(
            function="hello",
            action="isolate",
            node="n1",
            instance="i1",
            rule="cpu 1950m > 600m for 3 intervals (platform range)",
            figures={"cpu_millis": 1950.0},
            at_ms=16,
        ),
        "work.clamp": Clamp(incarnation="inc-1", instance="i1", function="hello", cpu_millis=200, reason="hog"),
        "work.configure-node": ConfigureNode(
            incarnation="inc-1",
            labels={"stoker.io/role": "isolated", "old": None},
            add_taints=[Taint(key="stoker.io/dedicated", value="isolated", effect="NoSchedule")],
            remove_taints=["maintenance"],
            unschedulable=False,
            drain=True,
        ),
        "workflow.spec": _workflow(),
        "node.observed": NodeObserved(
            node="n1",
            labels={"a": "b"},
            taints=[Taint(key="k", effect="NoExecute")],
            capacity=NodeCapacity(cpu_millis=1500),
            unschedulable=True,
            ready=False,
            at_ms=1,
        ),
        "node.taints-requested": NodeTaintsRequested(
            node="n1", taints=[Taint(key="stoker.io/x")], keys=["stoker.io/x"], at_ms=1
        ),
        "workflow.run-started": RunStarted(
            run="r1", workflow=_workflow(), input={"a": 1}, reply_to="x", deadline_ms=5, requested_ms=1, at_ms=2
        ),
        "workflow.step-started": StepStarted(
            run="r1", step="s", item=2, attempt=2, invocation="r1:s:2:2", input=[1], at_ms=3
        ),
        "workflow.step-finished": StepFinished(
            run="r1",
            step="s",
            item=2,
            attempt=2,
            status="error",
            error=ErrorInfo(kind="ValueError"),
            start="warm",
            at_ms=4,
        ),
        "workflow.run-finished": RunFinished(run="r1", workflow="w", status="ok", output={"o": 1}, at_ms=5),
        "record.dead-lettered": DeadLettered(
            source_topic="stoker.invocation",
            partition=1,
            offset=99,
            key="k",
            reason="not valid JSON",
            value="{",
            value_b64="ew==",
            consumer="dispatcher",
            at_ms=13,
        ),
        "trigger.spec": TriggerSpec(
            name="orders-in", function="hello", topic="orders", error_topic="orders.failed", ordered="per-key",
            created_ms=1, updated_ms=2, active_since_ms=3,
        ),
        "trigger.fired": TriggerFired(trigger="tick", slot_ms=60_000, invocation="cron.tick.60000", at_ms=14),
        "token.issued": TokenIssued(
            id="ab12cd34ef56", name="ci", scopes=["invoke:orders-*", "read"], digest="0" * 64, rate_per_s=5.0,
            expires_ms=99, by="stoker up", created_ms=16,
        ),
        "token.revoked": TokenRevoked(id="ab12cd34ef56", name="ci", by="admin", at_ms=17),
        "audit.recorded": AuditRecorded(
            principal="ab12cd34ef56 (ci)", method="DELETE", path="/api/v1/functions/x", status=204, at_ms=18
        ),
        "trigger.status": TriggerStatus(
            trigger="orders-in", instance="trigger", state="running", lag={"0": 2}, at_ms=15
        ),
        "trigger.failed": TriggerFailed(
            trigger="orders-in",
            function="hello",
            source_topic="orders",
            partition=1,
            offset=9,
            reason="function_failed",
            error=ErrorInfo(kind="ValueError", message="bad"), attempts=4, invocations=["trg.orders-in.orders-1-9"],
            value={"a": 1}, at_ms=16,
        ),
    }


# ----- the public contract --------------------------------------------------------------------


def test_public_contract_example_decodes() -> None:
    raw = orjson.dumps(
        {
            "type": "invocation.requested",
            "version": 1,
            "id": "abc-123",
            "function": "hello",
            "payload": {"any": "json"},
            "reply_to": None,
            "deadline_ms": None,
        }
    )
    rec = decode(raw)
    assert isinstance(rec, InvocationRequested)
    assert rec.id == "abc-123"
    assert rec.function == "hello"
    assert rec.payload == {"any": "json"}
    assert rec.reply_to is None
    assert rec.deadline_ms is None
    assert rec.requested_ms > 0  # filled in by default when the client omits it


def test_public_contract_decodes_with_expected_invocation_type() -> None:
    raw = b'{"type":"invocation.requested","version":1,"id":"x","function":"hello","payload":[1,2]}'
    rec = decode(raw, expected=(InvocationRequested,))
    assert isinstance(rec, InvocationRequested)
    assert rec.payload == [1, 2]


def test_samples_cover_every_model() -> None:
    assert set(_samples()) == set(MODELS)
    assert set(SUPPORTED_VERSIONS) == set(MODELS)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_round_trip_every_model(kind: str) -> None:
    record = _samples()[kind]
    data = encode(record)  # type: ignore[arg-type]
    assert isinstance(data, bytes)
    back = decode(data)
    assert type(back) is MODELS[kind]
    assert back == record
    assert back.type == kind
    assert back.version == 1
    # Stable: encoding the decoded record gives the same bytes.
    assert encode(back) == data
    # And it is accepted when its own model is the expected one.
    assert decode(data, expected=(MODELS[kind],)) == record


def test_encode_is_compact_json_with_type_and_version() -> None:
    data = encode(NodeStopped(node="n", incarnation="i", at_ms=1))
    assert orjson.loads(data) == {"type": "node.stopped", "version": 1, "node": "n", "incarnation": "i", "at_ms": 1}
    assert b" " not in data


def test_missing_version_defaults_to_1() -> None:
    rec = decode(b'{"type":"node.stopped","node":"n","incarnation":"i"}')
    assert isinstance(rec, NodeStopped)
    assert rec.version == 1


def test_unknown_extra_fields_are_ignored() -> None:
    raw = orjson.dumps(
        {
            "type": "invocation.requested",
            "version": 1,
            "id": "x",
            "function": "hello",
            "payload": None,
            "new_field_from_the_future": {"nested": True},
            "priority": 7,
        }
    )
    rec = decode(raw)
    assert isinstance(rec, InvocationRequested)
    assert not hasattr(rec, "new_field_from_the_future")
    assert "priority" not in rec.model_dump()


def test_unknown_fields_ignored_in_nested_models() -> None:
    hb = orjson.loads(encode(_samples()["node.heartbeat"]))  # type: ignore[arg-type]
    hb["capacity"]["gpus"] = 2
    hb["instances"][0]["future"] = "x"
    hb["taints"][0]["since"] = 1
    rec = decode(orjson.dumps(hb))
    assert rec == _samples()["node.heartbeat"]


# ----- DecodeError reasons ---------------------------------------------------------------------


def _reason(data: bytes | None, expected=None) -> str:
    with pytest.raises(DecodeError) as info:
        decode(data, expected)
    assert isinstance(info.value, ValueError)
    assert str(info.value) == info.value.reason
    return info.value.reason


def test_not_json() -> None:
    assert "not valid JSON" in _reason(b"{not json")
    assert "not valid JSON" in _reason(b"")
    assert "not valid JSON" in _reason(b"\xff\xfe")


def test_json_array_is_not_a_record() -> None:
    reason = _reason(b'[{"type":"node.stopped"}]')
    assert "JSON object" in reason
    assert "list" in reason


def test_json_scalar_is_not_a_record() -> None:
    assert "JSON object" in _reason(b'"invocation.requested"')
    assert "JSON object" in _reason(b"null")


def test_unknown_type() -> None:
    assert "unknown record type 'invocation.exploded'" in _reason(b'{"type":"invocation.exploded","version":1}')


def test_missing_or_non_string_type() -> None:
    assert "unknown record type None" in _reason(b'{"version":1}')
    assert "unknown record type 5" in _reason(b'{"type":5}')


@pytest.mark.parametrize("version", [2, 0, -1, "1", 1.0, None])
def test_unsupported_versions(version: object) -> None:
    raw = orjson.dumps({"type": "invocation.requested", "version": version, "id": "x", "function": "hello"})
    reason = _reason(raw)
    assert "unsupported version" in reason
    assert repr(version) in reason
    assert "invocation.requested" in reason


def test_schema_failure_names_the_field() -> None:
    reason = _reason(b'{"type":"invocation.requested","version":1,"id":"x"}')
    assert reason.startswith("invocation.requested failed its schema")
    assert "function" in reason


def test_schema_failure_names_nested_field() -> None:
    hb = orjson.loads(encode(_samples()["node.heartbeat"]))  # type: ignore[arg-type]
    hb["capacity"]["max_instances"] = "many"
    reason = _reason(orjson.dumps(hb))
    assert "node.heartbeat failed its schema" in reason
    assert "capacity.max_instances" in reason


def test_schema_failure_on_bad_status_literal() -> None:
    raw = b'{"type":"invocation.completed","id":"x","function":"f","status":"maybe"}'
    reason = _reason(raw)
    assert "invocation.completed failed its schema" in reason
    assert "status" in reason


def test_wrong_type_when_expected_given() -> None:
    data = encode(NodeStopped(node="n", incarnation="i"))
    reason = _reason(data, expected=(InvocationRequested,))
    assert "'node.stopped' does not belong here" in reason
    assert "invocation.requested" in reason


def test_expected_tuple_lists_all_names() -> None:
    data = encode(EnsurePool(incarnation="i", generic=1))
    reason = _reason(data, expected=(NodeHeartbeat, NodeStopped))
    assert "node.heartbeat, node.stopped" in reason
    assert isinstance(decode(data, expected=(Execute, Specialize, EnsurePool, Recycle)), EnsurePool)


def test_tombstone_is_an_error() -> None:
    assert "tombstone" in _reason(None)


def test_from_object_validates_parsed_objects() -> None:
    rec = from_object({"type": "node.stopped", "node": "n", "incarnation": "i"})
    assert isinstance(rec, NodeStopped)
    with pytest.raises(DecodeError):
        from_object(["node.stopped"])


def test_decode_refuses_negative_pool_size() -> None:
    assert "generic" in _reason(b'{"type":"work.ensure-pool","incarnation":"i","generic":-1}')


# ----- models ----------------------------------------------------------------------------------


def test_records_are_frozen() -> None:
    inv = InvocationRequested(function="hello")
    with pytest.raises(ValidationError):
        inv.function = "other"  # type: ignore[misc]


def test_invocation_ids_are_unique_and_deadline_expiry() -> None:
    a, b = InvocationRequested(function="f"), InvocationRequested(function="f")
    assert a.id != b.id
    assert not a.expired(10**15)  # no deadline: never expires
    c = InvocationRequested(function="f", deadline_ms=1000)
    assert not c.expired(999)
    assert c.expired(1000)
    assert c.expired(1001)


@pytest.mark.parametrize("name", ["hello", "a", "0", "hello-world-2", "a" * 63, "9lives"])
def test_function_name_valid(name: str) -> None:
    assert _spec(name=name).name == name


@pytest.mark.parametrize(
    "name", ["Hello", "HELLO", "hello_world", "a" * 64, "-hello", "hello-", "", "he.llo", "hello world"]
)
def test_function_name_invalid(name: str) -> None:
    with pytest.raises(ValidationError) as info:
        _spec(name=name)
    assert "DNS label" in str(info.value)


def test_bad_function_name_on_the_wire_is_a_decode_error() -> None:
    raw = orjson.loads(encode(_spec()))
    raw["name"] = "Bad_Name"
    reason = _reason(orjson.dumps(raw))
    assert "function.spec failed its schema" in reason
    assert "name" in reason


@pytest.mark.parametrize("entrypoint", ["handler:main", "pkg.mod:main", "_m:_f", "pkg.sub_mod:run2"])
def test_entrypoint_valid(entrypoint: str) -> None:
    assert _spec(entrypoint=entrypoint).entrypoint == entrypoint


@pytest.mark.parametrize(
    "entrypoint",
    [
        "handler",
        "handler:",
        ":main",
        "1mod:main",
        "handler:main.x",
        "handler:ma-in",
        "mod:1f",
        "a:b:c",
        "",
        "han dler:main",
    ],
)
def test_entrypoint_invalid(entrypoint: str) -> None:
    with pytest.raises(ValidationError) as info:
        _spec(entrypoint=entrypoint)
    assert "module:function" in str(info.value)


def test_code_version_archive_digest() -> None:
    assert _spec().code_version == "ab" * 6
    assert len(_spec().code_version) == 12


def test_code_version_git_commit_wins() -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    spec = _spec(source=CodeSource(kind="git", digest=DIGEST, git_url="https://x/y.git", git_commit=commit))
    assert spec.code_version == commit[:12]


def test_code_version_falls_back_to_revision() -> None:
    assert _spec(source=CodeSource(), revision=7).code_version == "r7"


@pytest.mark.parametrize(
    "field,value",
    [
        ("memory_mb", 8),
        ("timeout_s", 0),
        ("concurrency", 0),
        ("idle_s", 0),
        ("max_invocations", 0),
        ("runtime", "python2.7"),
    ],
)
def test_function_spec_limits(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        _spec(**{field: value})


def test_function_spec_defaults() -> None:
    spec = _spec()
    assert (spec.type, spec.runtime, spec.revision, spec.concurrency, spec.reuse) == (
        "function.spec",
        "python3.11",
        1,
        100,
        "keep",
    )
    assert spec.idle_s is None
    assert spec.node_selector == {"stoker.io/role": "runtime"}
    assert spec.tolerations == [
        Toleration(key="stoker.io/dedicated", operator="Equal", value="runtime", effect="NoSchedule")
    ]
    assert spec.tolerations == [RUNTIME_TOLERATION]
    # Each spec gets its own defaults.
    assert spec.node_selector is not _spec().node_selector


def test_function_spec_from_before_placement_decodes_with_the_defaults() -> None:
    raw = orjson.loads(encode(_spec()))
    del raw["node_selector"], raw["tolerations"]
    rec = decode(orjson.dumps(raw))
    assert isinstance(rec, FunctionSpec)
    assert rec.node_selector == {"stoker.io/role": "runtime"}
    assert rec.tolerations == [RUNTIME_TOLERATION]


def test_node_heartbeat_is_schedulable_by_default() -> None:
    hb = NodeHeartbeat(node="n", incarnation="i")
    assert hb.unschedulable is False
    assert (hb.labels, hb.taints) == ({}, [])
    rec = decode(b'{"type":"node.heartbeat","node":"n","incarnation":"i"}')
    assert isinstance(rec, NodeHeartbeat) and rec.unschedulable is False


def test_toleration_defaults() -> None:
    tol = Toleration()
    assert (tol.key, tol.operator, tol.value, tol.effect) == ("", "Equal", "", "")
    assert ISOLATED_TOLERATION == Toleration(
        key="stoker.io/dedicated", operator="Equal", value="isolated", effect="NoSchedule"
    )


def test_placement_override_defaults_isolate() -> None:
    override = PlacementOverride(function="hello")
    assert override.node_selector == {"stoker.io/role": "isolated"}
    assert override.tolerations == [ISOLATED_TOLERATION]
    assert (override.until_ms, override.reason, override.by) == (None, "", "")
    rec = decode(b'{"type":"placement.override","function":"hello"}')
    assert isinstance(rec, PlacementOverride)
    assert rec.node_selector == {"stoker.io/role": "isolated"}
    assert rec.tolerations == [ISOLATED_TOLERATION]


@pytest.mark.parametrize(
    "toleration",
    [
        {"key": "k", "operator": "In"},
        {"key": "k", "effect": "NoEvict"},
        {"key": "k", "operator": "exists"},
    ],
)
def test_bad_toleration_on_the_wire_is_a_decode_error(toleration: dict) -> None:
    raw = orjson.loads(encode(_spec()))
    raw["tolerations"] = [toleration]
    reason = _reason(orjson.dumps(raw))
    assert "function.spec failed its schema" in reason
    assert "tolerations.0" in reason


def test_bad_taint_effect_on_the_wire_is_a_decode_error() -> None:
    hb = orjson.loads(encode(_samples()["node.heartbeat"]))  # type: ignore[arg-type]
    hb["taints"][0]["effect"] = ""
    reason = _reason(orjson.dumps(hb))
    assert "node.heartbeat failed its schema" in reason
    assert "taints.0.effect" in reason


# ----- topics ----------------------------------------------------------------------------------


def test_topic_names_use_the_prefix() -> None:
    t = Topics("t1.")
    assert t.invocation == "t1.invocation"
    assert t.result == "t1.result"
    assert t.function == "t1.function"
    assert t.node == "t1.node"
    assert t.dlq == "t1.dlq"
    assert t.work("runtime-0") == "t1.work.runtime-0"
    assert t.reply("gw1") == "t1.reply.gw1"
    assert Topics().invocation == "stoker.invocation"


def test_topic_catalogue() -> None:
    t = Topics("p.")
    specs = {s.name: s for s in t.catalogue(invocation_partitions=5)}
    assert len(specs) == 22
    assert specs["p.audit"].configs()["retention.ms"] == str(90 * 24 * 3600 * 1000)
    assert specs["p.token"].compacted
    assert specs["p.dispatch"].compacted and specs["p.dispatch"].partitions == 5  # co-partitioned with invocations
    assert specs["p.workflow-invocation"].partitions == 5 and specs["p.name"].compacted
    assert specs["p.workflow"].compacted and not specs["p.workflow-run"].compacted
    assert t.throttle == "p.throttle"
    assert not specs["p.throttle"].compacted
    assert specs["p.throttle"].configs()["retention.ms"] == str(7 * 24 * 3600 * 1000)
    assert t.placement == "p.placement"
    assert all(name.startswith("p.") for name in specs)
    assert specs["p.invocation"].partitions == 5
    assert specs["p.result"].partitions == 5
    for compacted in ("p.function", "p.node", "p.artifact", "p.placement", "p.repo"):
        assert specs[compacted].compacted
        assert specs[compacted].configs()["cleanup.policy"] == "compact"
    assert not specs["p.invocation"].compacted
    assert "cleanup.policy" not in specs["p.invocation"].configs()
    assert specs["p.invocation"].configs()["retention.ms"] == str(24 * 3600 * 1000)
    assert t.work_spec("n").name == "p.work.n"
    assert t.work_spec("n").configs() == {"retention.ms": str(3600 * 1000)}
    assert t.reply_spec("g").name == "p.reply.g"


def test_encode_with_parts_decodes_to_the_same_record() -> None:
    from events import CodeSource, Execute, FunctionSpec, InvocationRequested
    from events.codec import decode, encode, encode_with_parts

    spec = FunctionSpec(name="hello", entrypoint="handler:main", source=CodeSource(digest="sha256:" + "cd" * 32))
    inv = InvocationRequested(function="hello", payload={"x": [1, "two", None]}, reply_to="r")
    model = Execute(invocation=inv, spec=spec, incarnation="a-1", attempt=2, dispatched_ms=123)
    spliced = encode_with_parts(
        "work.execute",
        {"invocation": encode(inv), "spec": encode(spec)},
        incarnation="a-1",
        attempt=2,
        dispatched_ms=123,
    )
    assert decode(spliced) == decode(encode(model)) == model
