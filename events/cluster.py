"""The cluster family: what Kubernetes says about nodes, and taints Stoker asks it to apply.

* ``node.observed`` on the node topic, key ``k8s/<node>`` (compacted; a tombstone when the Node is
  deleted or leaves the selection): what the Kubernetes API says about a node. A key of its own,
  not ``<node>``: the agent's heartbeats under ``<node>`` would otherwise compact it away, and
  readers keeping the latest record per key would see it replace the heartbeat. It is a record of
  what the API said, for operators: the services that read the node topic skip it and take a node's
  labels, taints, liveness and instances from its agent's heartbeat alone.
* ``node.taints-requested`` on ``<prefix>node-taint`` (compacted, key = node): the taints the
  throttler (or an operator) wants on a node. After nodewatch applied it, the node's taints whose
  key is in ``keys`` are exactly ``taints``; other taints are left alone, and only ``stoker.io/``
  keys are ever touched.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from events.base import Record, now_ms
from events.node import NodeCapacity, Taint

OBSERVED_KEY_PREFIX = "k8s/"


def observed_key(node: str) -> str:
    """The node topic key of a node's ``node.observed`` record."""
    return f"{OBSERVED_KEY_PREFIX}{node}"


class NodeObserved(Record):
    """A Kubernetes Node as the API server describes it (registration facts; no liveness)."""

    type: Literal["node.observed"] = "node.observed"
    node: str
    labels: dict[str, str] = Field(default_factory=dict)
    taints: list[Taint] = Field(default_factory=list)
    capacity: NodeCapacity = Field(default_factory=NodeCapacity)
    unschedulable: bool = False
    """Cordoned (``spec.unschedulable``): no new instances."""
    ready: bool = True
    """The Node's ``Ready`` condition."""
    source: str = "kubernetes"
    at_ms: int = Field(default_factory=now_ms)


class NodeTaintsRequested(Record):
    """Desired Stoker taints of one node; the latest per node wins (compacted topic)."""

    type: Literal["node.taints-requested"] = "node.taints-requested"
    node: str
    taints: list[Taint] = Field(default_factory=list)
    keys: list[str] = Field(default_factory=list)
    """The taint keys this request owns (their taints not in ``taints`` are removed); empty: the
    keys of ``taints``."""
    reason: str = ""
    requested_by: str = ""
    at_ms: int = Field(default_factory=now_ms)

    @model_validator(mode="after")
    def _keys_cover_taints(self) -> NodeTaintsRequested:
        outside = sorted({t.key for t in self.taints} - set(self.owned_keys))
        if outside:
            raise ValueError(f"taints {outside} are outside keys {self.keys}")
        return self

    @property
    def owned_keys(self) -> list[str]:
        return self.keys or sorted({t.key for t in self.taints})
