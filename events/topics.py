"""The topic catalogue: every Stoker topic, its key, and how it is kept.

Services coordinate only through these topics. Names carry a configurable prefix
(``stoker.`` by default) so several platforms, or several test runs, can share one broker.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "stoker."
INVOCATION_PARTITIONS = 6
"""Partitions of the invocation topic and of those keyed like it (results, dispatch records): the
most dispatchers that can share the work."""


@dataclass(frozen=True)
class TopicSpec:
    """How one topic is created."""

    name: str
    partitions: int = 1
    compacted: bool = False
    """Compacted topics keep the latest record per key: desired state, not a history."""
    retention_ms: int | None = None
    """Retention for non-compacted topics; ``None`` keeps the broker default."""

    def configs(self) -> dict[str, str]:
        """Topic-level configs for the admin API."""
        configs: dict[str, str] = {}
        if self.compacted:
            configs["cleanup.policy"] = "compact"
            # Small segments and a low dirty ratio let compaction actually run on a dev broker.
            configs["segment.ms"] = str(60 * 60 * 1000)
            configs["min.cleanable.dirty.ratio"] = "0.1"
        if self.retention_ms is not None:
            configs["retention.ms"] = str(self.retention_ms)
        return configs


_HOUR_MS = 60 * 60 * 1000


@dataclass(frozen=True)
class Topics:
    """Names of every Stoker topic under one prefix."""

    prefix: str = DEFAULT_PREFIX

    @property
    def function(self) -> str:
        """Compacted desired FunctionSpec per function name (tombstone = deleted)."""
        return f"{self.prefix}function"

    @property
    def invocation(self) -> str:
        """``invocation.requested`` records, keyed by function name (the public entry point)."""
        return f"{self.prefix}invocation"

    @property
    def result(self) -> str:
        """``invocation.completed`` records, keyed by invocation id."""
        return f"{self.prefix}result"

    @property
    def instance(self) -> str:
        """Instance lifecycle events, keyed by node."""
        return f"{self.prefix}instance"

    @property
    def node(self) -> str:
        """Compacted node registration and heartbeat, keyed by node."""
        return f"{self.prefix}node"

    @property
    def code_commit(self) -> str:
        return f"{self.prefix}code-commit"

    @property
    def artifact(self) -> str:
        return f"{self.prefix}artifact"

    @property
    def prewarm(self) -> str:
        return f"{self.prefix}prewarm"

    @property
    def node_metric(self) -> str:
        return f"{self.prefix}node-metric"

    @property
    def placement(self) -> str:
        return f"{self.prefix}placement"

    @property
    def build(self) -> str:
        """Build history (``build.started``/``build.finished``), key = function."""
        return f"{self.prefix}build"

    @property
    def repo(self) -> str:
        """Compacted per-repository settings (webhook secrets), key = repo URL."""
        return f"{self.prefix}repo"

    @property
    def throttle(self) -> str:
        """Throttler decisions (``throttle.decided``), key = function."""
        return f"{self.prefix}throttle"

    @property
    def node_taint(self) -> str:
        """Compacted taints Stoker wants on Kubernetes nodes (``node.taints-requested``), key = node."""
        return f"{self.prefix}node-taint"

    @property
    def workflow(self) -> str:
        """Compacted workflow definitions, key = workflow name (tombstone = deleted)."""
        return f"{self.prefix}workflow"

    @property
    def workflow_run(self) -> str:
        """Event-sourced run state of workflows, key = run id."""
        return f"{self.prefix}workflow-run"

    @property
    def dispatch(self) -> str:
        """Compacted state of the dispatchers: what each accepted invocation waits for or runs on.

        Key = invocation id; each record is written to the partition number of the invocation's
        own partition, so the dispatcher that is assigned invocation partition *p* rebuilds its
        queue and in-flight ledger from partition *p* here. A tombstone = the invocation ended.
        """
        return f"{self.prefix}dispatch"

    @property
    def workflow_invocation(self) -> str:
        """Invocations of workflows, forwarded by the dispatcher (it owns the name), key = workflow name."""
        return f"{self.prefix}workflow-invocation"

    @property
    def name(self) -> str:
        """Compacted claims of invocable names: a name is a function or a workflow, never both."""
        return f"{self.prefix}name"

    @property
    def token(self) -> str:
        """Compacted API tokens (``token.issued`` / ``token.revoked``, only their hashes), key = token id."""
        return f"{self.prefix}token"

    @property
    def audit(self) -> str:
        """``audit.recorded``: every management action through the gateway, key = principal."""
        return f"{self.prefix}audit"

    @property
    def dlq(self) -> str:
        """Dead letters: records a consumer could not decode or process, with the reason."""
        return f"{self.prefix}dlq"

    def work(self, node: str) -> str:
        """Commands addressed to one node's agent (Execute, Specialize, EnsurePool, Recycle)."""
        return f"{self.prefix}work.{node}"

    def reply(self, name: str) -> str:
        """A private reply topic (one per gateway process) for synchronous calls."""
        return f"{self.prefix}reply.{name}"

    def catalogue(self, invocation_partitions: int = INVOCATION_PARTITIONS) -> list[TopicSpec]:
        """Every shared topic, as ``stoker up`` creates it (work and reply topics come per node)."""
        return [
            TopicSpec(self.function, compacted=True),
            TopicSpec(self.invocation, partitions=invocation_partitions, retention_ms=24 * _HOUR_MS),
            TopicSpec(self.dispatch, partitions=invocation_partitions, compacted=True),
            TopicSpec(self.workflow_invocation, partitions=invocation_partitions, retention_ms=24 * _HOUR_MS),
            TopicSpec(self.name, compacted=True),
            TopicSpec(self.result, partitions=invocation_partitions, retention_ms=24 * _HOUR_MS),
            TopicSpec(self.instance, retention_ms=6 * _HOUR_MS),
            TopicSpec(self.node, compacted=True),
            TopicSpec(self.code_commit, retention_ms=7 * 24 * _HOUR_MS),
            TopicSpec(self.artifact, compacted=True),
            TopicSpec(self.prewarm, retention_ms=_HOUR_MS),
            TopicSpec(self.node_metric, retention_ms=6 * _HOUR_MS),
            TopicSpec(self.placement, compacted=True),
            TopicSpec(self.build, retention_ms=7 * 24 * _HOUR_MS),
            TopicSpec(self.throttle, retention_ms=7 * 24 * _HOUR_MS),
            TopicSpec(self.workflow, compacted=True),
            TopicSpec(self.node_taint, compacted=True),
            TopicSpec(self.workflow_run, partitions=invocation_partitions, retention_ms=7 * 24 * _HOUR_MS),
            TopicSpec(self.repo, compacted=True),
            TopicSpec(self.token, compacted=True),
            TopicSpec(self.audit, retention_ms=90 * 24 * _HOUR_MS),
            TopicSpec(self.dlq, retention_ms=7 * 24 * _HOUR_MS),
        ]

    def work_spec(self, node: str) -> TopicSpec:
        # Work commands are addressed to one incarnation of an agent; an hour is plenty.
        return TopicSpec(self.work(node), retention_ms=_HOUR_MS)

    def reply_spec(self, name: str) -> TopicSpec:
        return TopicSpec(self.reply(name), retention_ms=_HOUR_MS)
