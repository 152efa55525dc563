"""Unit tests of services.agent.settings: label and taint parsing, settings from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from events import Taint
from services.agent.settings import AgentSettings, parse_labels, parse_taints


def test_parse_labels() -> None:
    assert parse_labels("a=b,c=d") == {"a": "b", "c": "d"}
    assert parse_labels("topology.kubernetes.io/zone=eu-west-1a") == {"topology.kubernetes.io/zone": "eu-west-1a"}


def test_parse_labels_strips_parts_and_skips_empty_ones() -> None:
    assert parse_labels("") == {}
    assert parse_labels(" , ,") == {}
    assert parse_labels(" a=b ,, c=d ") == {"a": "b", "c": "d"}


def test_parse_labels_values() -> None:
    assert parse_labels("a=") == {"a": ""}
    assert parse_labels("a=b=c") == {"a": "b=c"}
    assert parse_labels("a=1,a=2") == {"a": "2"}  # the last one wins


@pytest.mark.parametrize("raw", ["a", "a=b,c", "=b", "a=b,=c"])
def test_parse_labels_rejects_non_key_value(raw: str) -> None:
    with pytest.raises(ValueError, match="not key=value"):
        parse_labels(raw)


def test_parse_taints() -> None:
    assert parse_taints("stoker.io/dedicated=runtime:NoSchedule") == [
        Taint(key="stoker.io/dedicated", value="runtime", effect="NoSchedule")
    ]
    assert parse_taints("gpu:PreferNoSchedule, maint=soon:NoExecute") == [
        Taint(key="gpu", value="", effect="PreferNoSchedule"),
        Taint(key="maint", value="soon", effect="NoExecute"),
    ]
    assert parse_taints("") == []
    assert parse_taints(" , ") == []


def test_parse_taints_value_may_hold_colons() -> None:
    # The effect is after the last colon.
    assert parse_taints("k=a:b:NoSchedule") == [Taint(key="k", value="a:b", effect="NoSchedule")]


@pytest.mark.parametrize("raw", ["gpu", "k=v", "k=v:Sometimes", "k=v:noschedule", "k=v:"])
def test_parse_taints_rejects_bad_taints(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_taints(raw)


def test_agent_settings_from_env(tmp_path: Path) -> None:
    env = {
        "STOKER_HOME": str(tmp_path),
        "STOKER_NODE_NAME": "gpu-1",
        "STOKER_POOL_SIZE": "3",
        "STOKER_MAX_INSTANCES": "16",
        "STOKER_HEARTBEAT_S": "0.25",
        "STOKER_NODE_LABELS": "accel=gpu,stoker.io/role=batch",
        "STOKER_NODE_TAINTS": "stoker.io/dedicated=isolated:NoSchedule",
        "STOKER_TOPIC_PREFIX": "x.",
    }
    s = AgentSettings.from_env(env)
    assert s.node == "gpu-1"
    assert (s.pool_size, s.max_instances, s.heartbeat_interval_s) == (3, 16, 0.25)
    assert s.labels == {"stoker.io/role": "batch", "kubernetes.io/hostname": "gpu-1", "accel": "gpu"}
    assert s.taints == [Taint(key="stoker.io/dedicated", value="isolated", effect="NoSchedule")]
    assert s.common.home == tmp_path.resolve()
    assert s.common.topics.work(s.node) == "x.work.gpu-1"
    assert s.node_dir == tmp_path.resolve() / "nodes" / "gpu-1"


def test_agent_settings_defaults(tmp_path: Path) -> None:
    s = AgentSettings.from_env({"STOKER_HOME": str(tmp_path)})
    assert s.node == "runtime-0"
    assert s.labels == {"stoker.io/role": "runtime", "kubernetes.io/hostname": "runtime-0"}
    assert s.taints == []
    assert (s.pool_size, s.max_instances) == (2, 8)


def test_agent_settings_bad_number(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="STOKER_POOL_SIZE"):
        AgentSettings.from_env({"STOKER_HOME": str(tmp_path), "STOKER_POOL_SIZE": "two"})


def test_labels_are_trimmed_and_taints_need_a_key() -> None:
    import pytest

    from services.agent.settings import parse_labels, parse_taints

    assert parse_labels("a = b") == {"a": "b"}
    with pytest.raises(ValueError):
        parse_taints(":NoSchedule")
