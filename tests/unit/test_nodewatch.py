"""nodewatch: Kubernetes Node JSON -> Stoker node facts, taint patches, and what the service does with them."""

from __future__ import annotations

import asyncio
import copy
from decimal import Decimal
from typing import Any

import orjson
import pytest

from events import NodeCapacity, NodeHeartbeat, Taint
from events.cluster import NodeObserved, NodeTaintsRequested, observed_key
from services.nodewatch.app import Nodewatch, PatchFailed
from services.nodewatch.book import NodeBook
from services.nodewatch.mapping import (
    QuantityError,
    cpu_millis,
    memory_mb,
    node_capacity,
    node_ready,
    node_taints,
    node_to_registration,
    parse_quantity,
    taint_patch,
    wanted_taints,
)
from services.nodewatch.settings import DEFAULT_SELECTOR, NodewatchSettings


def k8s_node(
    name: str = "worker-1",
    *,
    labels: dict[str, str] | None = None,
    taints: list[dict[str, Any]] | None = None,
    allocatable: dict[str, str] | None = None,
    capacity: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    unschedulable: bool | None = None,
    ready: str | None = "True",
) -> dict[str, Any]:
    """A Node as the API returns it (trimmed), camelCase and all."""
    node: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "uid": "5f1c1e4e-0000-4000-8000-000000000001",
            "resourceVersion": "1234",
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "stoker.io/role": "runtime",
                "topology.kubernetes.io/zone": "eu-west-1a",
            }
            if labels is None
            else labels,
            "annotations": annotations or {"node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"podCIDR": "10.244.1.0/24"},
        "status": {
            "capacity": capacity or {"cpu": "4", "memory": "16318976Ki", "pods": "110"},
            "allocatable": allocatable or {"cpu": "3920m", "memory": "15267840Ki", "pods": "110"},
            "conditions": [
                {"type": "MemoryPressure", "status": "False"},
                {"type": "DiskPressure", "status": "False"},
            ]
            + ([{"type": "Ready", "status": ready, "reason": "KubeletReady"}] if ready is not None else []),
        },
    }
    if taints is not None:
        node["spec"]["taints"] = taints
    if unschedulable is not None:
        node["spec"]["unschedulable"] = unschedulable
    return node


RUNTIME_TAINT = {"key": "stoker.io/dedicated", "value": "runtime", "effect": "NoSchedule"}


# --------------------------------------------------------------------------- quantities


@pytest.mark.parametrize(
    ("text", "millis"),
    [
        ("2", 2000),
        ("1500m", 1500),
        ("3920m", 3920),
        ("0.5", 500),
        ("2.5", 2500),
        (".25", 250),
        ("100m", 100),
        ("1", 1000),
        ("0", 0),
        ("250000u", 250),
        ("1500000000n", 1500),
        ("1e3", 1_000_000),
        ("1k", 1_000_000),
        ("999u", 0),  # rounded down: less than a millicore
        (4, 4000),
        (0.1, 100),
    ],
)
def test_cpu_quantities_in_millicores(text: str | int | float, millis: int) -> None:
    assert cpu_millis(text) == millis


@pytest.mark.parametrize(
    ("text", "mb"),
    [
        ("8Gi", 8192),
        ("8000Mi", 8000),
        ("8192Mi", 8192),
        ("8388608Ki", 8192),
        ("16318976Ki", 15936),  # a real node: 15936.5 MiB, rounded down
        ("15267840Ki", 14910),
        ("1Ti", 1024 * 1024),
        ("8589934592", 8192),  # plain bytes
        ("8G", 7629),  # decimal: 8e9 bytes
        ("1e9", 953),
        ("512M", 488),
        ("1048576k", 1000),
        ("1.5Gi", 1536),
        ("0.5Gi", 512),
        ("1Mi", 1),
        ("1023Ki", 0),
    ],
)
def test_memory_quantities_in_mib(text: str, mb: int) -> None:
    assert memory_mb(text) == mb


def test_parse_quantity_is_exact() -> None:
    assert parse_quantity("1500m") == Decimal("1.5")
    assert parse_quantity("1Ki") == 1024
    assert parse_quantity("1E-3") == Decimal("0.001")
    assert parse_quantity(" 2 ") == 2


@pytest.mark.parametrize("bad", ["", "abc", "1.2.3", "8GB", "8gi", "Gi", "1 Gi", "--1", "1e", "0x10", "1m5"])
def test_malformed_quantities_are_refused(bad: str) -> None:
    with pytest.raises(QuantityError):
        parse_quantity(bad)


def test_negative_quantities_are_refused() -> None:
    with pytest.raises(QuantityError):
        cpu_millis("-1")
    with pytest.raises(QuantityError):
        memory_mb("-1Gi")
    with pytest.raises(QuantityError):
        parse_quantity(True)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- registration


def test_registration_of_a_runtime_node() -> None:
    reg = node_to_registration(k8s_node(taints=[RUNTIME_TAINT]))
    assert reg["node"] == "worker-1"
    assert reg["labels"]["stoker.io/role"] == "runtime"
    assert reg["labels"]["topology.kubernetes.io/zone"] == "eu-west-1a"
    assert reg["taints"] == [Taint(key="stoker.io/dedicated", value="runtime", effect="NoSchedule")]
    # allocatable, not capacity: what pods may actually use
    assert reg["capacity"] == NodeCapacity(max_instances=8, cpu_millis=3920, memory_mb=14910)
    assert reg["unschedulable"] is False
    assert reg["ready"] is True


def test_registration_fields_make_a_node_heartbeat_and_a_node_observed_record() -> None:
    reg = node_to_registration(k8s_node(taints=[RUNTIME_TAINT]))
    hb = NodeHeartbeat(incarnation="k8s", **reg)
    assert (hb.node, hb.labels, hb.taints, hb.capacity) == (reg["node"], reg["labels"], reg["taints"], reg["capacity"])
    observed = NodeObserved(**reg)
    wire = orjson.loads(observed.model_dump_json())
    assert wire["type"] == "node.observed"
    assert wire["taints"] == [RUNTIME_TAINT]
    assert wire["capacity"] == {"max_instances": 8, "cpu_millis": 3920, "memory_mb": 14910}
    assert NodeObserved.model_validate(wire) == observed
    assert observed_key("worker-1") == "k8s/worker-1"


@pytest.mark.parametrize("effect", ["NoSchedule", "PreferNoSchedule", "NoExecute"])
def test_every_taint_effect_is_read(effect: str) -> None:
    raw = {"key": "stoker.io/dedicated", "value": "isolated", "effect": effect}
    assert node_taints(k8s_node(taints=[raw])) == [Taint(key="stoker.io/dedicated", value="isolated", effect=effect)]  # type: ignore[arg-type]


def test_taints_keep_order_drop_unknown_effects_and_read_missing_values_as_empty() -> None:
    taints = [
        {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute", "timeAdded": "2026-01-01T00:00:00Z"},
        {"key": "stoker.io/dedicated", "value": "runtime", "effect": "NoSchedule"},
        {"key": "future.example/x", "value": "y", "effect": "NoSomethingNew"},
        {"effect": "NoSchedule"},  # no key: not a taint
        {"key": "gpu", "value": "", "effect": "PreferNoSchedule"},
    ]
    assert node_taints(k8s_node(taints=taints)) == [
        Taint(key="node.kubernetes.io/not-ready", value="", effect="NoExecute"),
        Taint(key="stoker.io/dedicated", value="runtime", effect="NoSchedule"),
        Taint(key="gpu", value="", effect="PreferNoSchedule"),
    ]


def test_a_node_without_taints_or_labels() -> None:
    reg = node_to_registration(k8s_node(labels={}))
    assert reg["taints"] == [] and reg["labels"] == {}


def test_capacity_falls_back_to_capacity_then_to_defaults() -> None:
    node = k8s_node()
    del node["status"]["allocatable"]
    assert node_capacity(node) == NodeCapacity(max_instances=8, cpu_millis=4000, memory_mb=15936)
    node["status"] = {}
    assert node_capacity(node, default_max_instances=3) == NodeCapacity(max_instances=3)
    assert node_capacity({"metadata": {"name": "bare"}}) == NodeCapacity()


def test_max_instances_from_annotation_or_label() -> None:
    assert node_capacity(k8s_node(annotations={"stoker.io/max-instances": "16"})).max_instances == 16
    labelled = k8s_node(labels={"stoker.io/role": "runtime", "stoker.io/max-instances": "12"})
    assert node_capacity(labelled).max_instances == 12
    both = k8s_node(
        labels={"stoker.io/max-instances": "12"},
        annotations={"stoker.io/max-instances": "20"},
    )
    assert node_capacity(both).max_instances == 20  # the annotation wins
    for bad in ("0", "-3", "many", ""):
        assert node_capacity(k8s_node(annotations={"stoker.io/max-instances": bad})).max_instances == 8


def test_cordoned_and_not_ready_nodes() -> None:
    assert node_to_registration(k8s_node(unschedulable=True))["unschedulable"] is True
    assert node_ready(k8s_node(ready="False")) is False
    assert node_ready(k8s_node(ready="Unknown")) is False
    assert node_ready(k8s_node(ready=None)) is False  # no Ready condition yet


def test_a_malformed_node_is_refused() -> None:
    with pytest.raises(ValueError):
        node_to_registration({"metadata": {}})
    with pytest.raises(QuantityError):
        node_to_registration(k8s_node(allocatable={"cpu": "lots"}))


# --------------------------------------------------------------------------- taint patches


ISOLATED = Taint(key="stoker.io/dedicated", value="isolated", effect="NoSchedule")
NOT_READY = {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute", "timeAdded": "2026-01-01T00:00:00Z"}


def test_patch_adds_taints_to_an_untainted_node() -> None:
    assert taint_patch(None, [ISOLATED]) == [
        {
            "op": "add",
            "path": "/spec/taints",
            "value": [{"key": "stoker.io/dedicated", "value": "isolated", "effect": "NoSchedule"}],
        }
    ]
    assert taint_patch([], [ISOLATED])[0]["op"] == "add"  # the API leaves empty lists out


def test_patch_replaces_a_taint_of_the_same_key_and_keeps_the_others() -> None:
    current = [NOT_READY, RUNTIME_TAINT]
    patch = taint_patch(current, [ISOLATED])
    assert patch == [
        {"op": "test", "path": "/spec/taints", "value": current},
        {
            "op": "replace",
            "path": "/spec/taints",
            "value": [NOT_READY, {"key": "stoker.io/dedicated", "value": "isolated", "effect": "NoSchedule"}],
        },
    ]


def test_patch_is_empty_when_nothing_changes_whatever_the_order() -> None:
    current = [RUNTIME_TAINT, NOT_READY]
    assert taint_patch(current, [Taint(key="stoker.io/dedicated", value="runtime", effect="NoSchedule")]) == []
    assert taint_patch(current, [], keys=["stoker.io/overloaded"]) == []
    two = [{"key": "stoker.io/a", "effect": "NoSchedule"}, {"key": "stoker.io/b", "effect": "NoExecute"}]
    assert taint_patch(two, [Taint(key="stoker.io/b", effect="NoExecute"), Taint(key="stoker.io/a")]) == []


def test_patch_removes_the_owned_keys_not_wanted() -> None:
    current = [NOT_READY, RUNTIME_TAINT, {"key": "stoker.io/overloaded", "value": "cpu", "effect": "NoSchedule"}]
    patch = taint_patch(current, [], keys=["stoker.io/overloaded"])
    assert patch[1] == {"op": "replace", "path": "/spec/taints", "value": [NOT_READY, RUNTIME_TAINT]}


def test_patch_removing_the_last_taint_removes_the_field() -> None:
    current = [{"key": "stoker.io/overloaded", "value": "cpu", "effect": "NoSchedule"}]
    assert taint_patch(current, [], keys=["stoker.io/overloaded"]) == [
        {"op": "test", "path": "/spec/taints", "value": current},
        {"op": "remove", "path": "/spec/taints"},
    ]


def test_patch_keeps_time_added_of_a_wanted_taint_that_is_already_there() -> None:
    kept = {"key": "stoker.io/drain", "value": "", "effect": "NoExecute", "timeAdded": "2026-02-02T10:00:00Z"}
    wanted = [Taint(key="stoker.io/drain", effect="NoExecute"), Taint(key="stoker.io/drain", effect="NoSchedule")]
    patch = taint_patch([kept], wanted)
    assert patch[1]["value"] == [kept, {"key": "stoker.io/drain", "effect": "NoSchedule"}]


def test_patch_omits_empty_values_like_the_api() -> None:
    patch = taint_patch(None, [Taint(key="stoker.io/overloaded", effect="PreferNoSchedule")])
    assert patch[0]["value"] == [{"key": "stoker.io/overloaded", "effect": "PreferNoSchedule"}]


def test_patch_accepts_wanted_taints_as_dicts() -> None:
    patch = taint_patch([RUNTIME_TAINT], [{"key": "stoker.io/dedicated", "value": "isolated", "effect": "NoSchedule"}])
    assert patch[1]["value"] == [{"key": "stoker.io/dedicated", "value": "isolated", "effect": "NoSchedule"}]


def test_patch_does_not_modify_its_input() -> None:
    current = [RUNTIME_TAINT, NOT_READY]
    before = copy.deepcopy(current)
    taint_patch(current, [ISOLATED])
    assert current == before


@pytest.mark.parametrize(
    ("wanted", "keys", "message"),
    [
        ([Taint(key="node.kubernetes.io/unschedulable")], None, "not Stoker's"),
        ([], ["kubernetes.io/anything"], "not Stoker's"),
        ([ISOLATED], ["stoker.io/other"], "outside the keys"),
        ([ISOLATED, ISOLATED], None, "wanted twice"),
    ],
)
def test_refused_taint_requests(wanted: list[Taint], keys: list[str] | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        taint_patch([RUNTIME_TAINT], wanted, keys)


def test_unknown_effect_in_a_wanted_taint_is_refused() -> None:
    with pytest.raises(ValueError):
        wanted_taints(None, [{"key": "stoker.io/x", "effect": "Sometimes"}])


def test_other_domains_can_be_allowed_explicitly() -> None:
    patch = taint_patch(None, [Taint(key="example.com/x")], allowed_prefix=None)
    assert patch[0]["value"] == [{"key": "example.com/x", "effect": "NoSchedule"}]


# --------------------------------------------------------------------------- the book


def test_book_publishes_only_changes() -> None:
    book = NodeBook()
    node = k8s_node(taints=[RUNTIME_TAINT])
    first = book.observe(node)
    assert first is not None and first["node"] == "worker-1"
    assert book.observe(copy.deepcopy(node)) is None  # same facts, new resourceVersion or not
    node["metadata"]["resourceVersion"] = "1300"
    node["status"]["conditions"].append({"type": "PIDPressure", "status": "False"})
    assert book.observe(node) is None  # nothing Stoker reads changed
    node["metadata"]["labels"]["zone"] = "b"
    changed = book.observe(node)
    assert changed is not None and changed["labels"]["zone"] == "b"
    node["spec"]["unschedulable"] = True
    assert book.observe(node) is not None


def test_book_resync_reports_new_changed_and_gone_nodes() -> None:
    book = NodeBook()
    book.observe(k8s_node("a"))
    book.observe(k8s_node("b"))
    broken = k8s_node("d", allocatable={"memory": "a lot"})
    nodes = [k8s_node("b", labels={"stoker.io/role": "isolated"}), k8s_node("c"), broken, {"metadata": {}}]
    changed, gone, unreadable = book.resync(nodes)
    assert [r["node"] for r in changed] == ["b", "c"]
    assert gone == ["a"]
    assert [r.split(":")[0] for r in unreadable] == ["d", "(no name)"]
    assert book.remove("b") is True
    assert book.remove("b") is False


def test_book_patches_a_known_node_to_its_wish_and_validates_wishes() -> None:
    book = NodeBook()
    book.want("a", [ISOLATED])
    assert book.patch("a") == []  # not seen yet
    book.observe(k8s_node("a", taints=[RUNTIME_TAINT]))
    assert book.pending() == ["a"]
    assert book.patch("a")[1]["value"] == [{"key": "stoker.io/dedicated", "value": "isolated", "effect": "NoSchedule"}]
    book.observe(k8s_node("a", taints=[{"key": "stoker.io/dedicated", "value": "isolated", "effect": "NoSchedule"}]))
    assert book.patch("a") == [] and book.pending() == []
    book.forget_wish("a")
    assert book.patch("a") == []
    with pytest.raises(ValueError):
        book.want("a", [Taint(key="node.kubernetes.io/unschedulable")])


# --------------------------------------------------------------------------- the service, with fakes


class FakeCluster:
    """What Nodewatch publishes and how the API answers its patches."""

    def __init__(self) -> None:
        self.published: list[tuple[str, NodeObserved | None]] = []
        self.patches: list[tuple[str, list[dict[str, Any]]]] = []
        self.nodes: dict[str, dict[str, Any]] = {}
        self.refuse: int | None = None

    async def publish(self, node: str, record: NodeObserved | None) -> None:
        self.published.append((node, record))

    async def patch(self, name: str, body: list[dict[str, Any]]) -> dict[str, Any]:
        self.patches.append((name, body))
        if self.refuse is not None:
            raise PatchFailed(self.refuse, "refused")
        node = copy.deepcopy(self.nodes[name])
        for op in body:
            if op["op"] == "test":
                assert node["spec"].get("taints") == op["value"]
            elif op["op"] in ("add", "replace"):
                node["spec"]["taints"] = op["value"]
            else:
                node["spec"].pop("taints", None)
        self.nodes[name] = node
        return node


def request(node: str, taints: list[Taint], keys: list[str] | None = None) -> tuple[bytes, bytes]:
    wish = NodeTaintsRequested(node=node, taints=taints, keys=keys or [], reason="test", requested_by="pytest")
    return node.encode(), wish.model_dump_json().encode()


def test_service_publishes_lists_events_and_tombstones() -> None:
    fake = FakeCluster()
    watcher = Nodewatch(NodeBook(), fake.publish, fake.patch)

    async def go() -> None:
        await watcher.listed([k8s_node("a"), k8s_node("b")])
        await watcher.event("MODIFIED", k8s_node("a"))  # unchanged: nothing
        await watcher.event("MODIFIED", k8s_node("a", unschedulable=True))
        await watcher.event("BOOKMARK", {"metadata": {"resourceVersion": "99"}})
        await watcher.event("DELETED", k8s_node("b"))
        await watcher.event("DELETED", k8s_node("zzz"))  # never seen: no tombstone
        await watcher.listed([k8s_node("c"), k8s_node("x", allocatable={"cpu": "?"})])  # a gone; x unreadable

    asyncio.run(go())
    shown = [(node, rec.unschedulable if rec else None) for node, rec in fake.published]
    assert shown == [("a", False), ("b", False), ("a", True), ("b", None), ("a", None), ("c", False)]
    assert all(rec is None or rec.type == "node.observed" for _, rec in fake.published)


def test_service_keeps_the_last_good_record_of_a_node_it_cannot_read() -> None:
    fake = FakeCluster()
    watcher = Nodewatch(NodeBook(), fake.publish, fake.patch)

    async def go() -> None:
        await watcher.event("ADDED", k8s_node("a"))
        await watcher.event("MODIFIED", k8s_node("a", allocatable={"cpu": "lots"}))

    asyncio.run(go())
    assert len(fake.published) == 1


def test_service_applies_requested_taints_and_publishes_the_result() -> None:
    fake = FakeCluster()
    fake.nodes["a"] = k8s_node("a", taints=[RUNTIME_TAINT])
    watcher = Nodewatch(NodeBook(), fake.publish, fake.patch)
    overloaded = Taint(key="stoker.io/overloaded", value="cpu", effect="NoSchedule")

    async def go() -> None:
        await watcher.listed([fake.nodes["a"]])
        await watcher.request(*request("a", [overloaded]))
        await watcher.request(*request("a", [overloaded]))  # the same wish again: no second patch
        await watcher.event("MODIFIED", fake.nodes["a"])  # the watch echoes the change: nothing more

    asyncio.run(go())
    assert [name for name, _ in fake.patches] == ["a"]
    assert fake.nodes["a"]["spec"]["taints"] == [
        RUNTIME_TAINT,
        {"key": "stoker.io/overloaded", "value": "cpu", "effect": "NoSchedule"},
    ]
    last = fake.published[-1][1]
    assert last is not None and overloaded in last.taints


def test_service_releases_taints_with_an_empty_wish_and_ignores_withdrawals() -> None:
    fake = FakeCluster()
    fake.nodes["a"] = k8s_node("a", taints=[RUNTIME_TAINT, {"key": "stoker.io/overloaded", "effect": "NoSchedule"}])
    watcher = Nodewatch(NodeBook(), fake.publish, fake.patch)

    async def go() -> None:
        await watcher.listed([fake.nodes["a"]])
        await watcher.request(*request("a", [], keys=["stoker.io/overloaded"]))
        await watcher.request(b"a", None)  # tombstone: forget the wish, touch nothing

    asyncio.run(go())
    assert len(fake.patches) == 1
    assert fake.nodes["a"]["spec"]["taints"] == [RUNTIME_TAINT]
    assert watcher.book.wishes == {}


def test_service_retries_after_a_conflict_and_an_api_error() -> None:
    fake = FakeCluster()
    fake.nodes["a"] = k8s_node("a", taints=[RUNTIME_TAINT])
    watcher = Nodewatch(NodeBook(), fake.publish, fake.patch)

    async def go() -> None:
        await watcher.listed([fake.nodes["a"]])
        fake.refuse = 422  # someone changed the node's taints meanwhile
        await watcher.request(*request("a", [ISOLATED]))
        fake.refuse = 500
        await watcher.retry()
        fake.refuse = None
        changed = copy.deepcopy(fake.nodes["a"])
        changed["spec"]["taints"] = [NOT_READY, RUNTIME_TAINT]
        fake.nodes["a"] = changed
        await watcher.event("MODIFIED", changed)  # the newer state: patched from it
        await watcher.retry()  # applied: nothing pending

    asyncio.run(go())
    assert len(fake.patches) == 3
    assert fake.nodes["a"]["spec"]["taints"] == [
        NOT_READY,
        {"key": "stoker.io/dedicated", "value": "isolated", "effect": "NoSchedule"},
    ]


def test_service_ignores_bad_taint_requests() -> None:
    fake = FakeCluster()
    fake.nodes["a"] = k8s_node("a")
    watcher = Nodewatch(NodeBook(), fake.publish, fake.patch)
    foreign = NodeTaintsRequested.model_construct(
        node="a", taints=[Taint(key="node.kubernetes.io/unschedulable")], keys=[], reason="", requested_by=""
    )

    async def go() -> None:
        await watcher.listed([fake.nodes["a"]])
        await watcher.request(b"a", b"not json")
        await watcher.request(b"a", b'{"type": "node.taints-requested", "node": "a", "taints": [{"key": 1}]}')
        await watcher.request(b"b", request("a", [ISOLATED])[1])  # key and node disagree
        await watcher.request(None, request("a", [ISOLATED])[1])
        await watcher.request(b"a", foreign.model_dump_json().encode())  # not a stoker.io/ key

    asyncio.run(go())
    assert fake.patches == [] and watcher.book.wishes == {}


def test_taint_request_keys_must_cover_its_taints() -> None:
    with pytest.raises(ValueError):
        NodeTaintsRequested(node="a", taints=[ISOLATED], keys=["stoker.io/other"])
    assert NodeTaintsRequested(node="a", taints=[ISOLATED]).owned_keys == ["stoker.io/dedicated"]


def test_settings_from_env() -> None:
    s = NodewatchSettings.from_env({"STOKER_TOPIC_PREFIX": "t1.", "STOKER_MAX_INSTANCES": "5"})
    assert s.label_selector == DEFAULT_SELECTOR
    assert s.taint_topic == "t1.node-taint"
    assert s.default_max_instances == 5
    every = NodewatchSettings.from_env({"STOKER_NODEWATCH_SELECTOR": "", "STOKER_NODEWATCH_TAINT_TOPIC": "x"})
    assert every.label_selector == "" and every.taint_topic == "x"
