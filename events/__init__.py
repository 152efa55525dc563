"""Stoker's contracts: the topic catalogue, every event and command model, and the codec."""

from events.base import Record, now_ms
from events.codec import DecodeError, decode, encode
from events.dlq import DeadLettered
from events.function import CodeSource, FunctionSpec
from events.instance import InstanceChanged, InstanceState
from events.invocation import (
    TERMINAL_STATUSES,
    ErrorInfo,
    InvocationCompleted,
    InvocationRequested,
    StartKind,
    Status,
    Timings,
    new_invocation_id,
)
from events.node import InstanceSummary, NodeCapacity, NodeHeartbeat, NodeStopped, Taint
from events.topics import DEFAULT_PREFIX, Topics, TopicSpec
from events.work import EnsurePool, Execute, Recycle, Specialize, WorkCommand

__all__ = [
    "DEFAULT_PREFIX",
    "TERMINAL_STATUSES",
    "CodeSource",
    "DeadLettered",
    "DecodeError",
    "EnsurePool",
    "ErrorInfo",
    "Execute",
    "FunctionSpec",
    "InstanceChanged",
    "InstanceState",
    "InstanceSummary",
    "InvocationCompleted",
    "InvocationRequested",
    "NodeCapacity",
    "NodeHeartbeat",
    "NodeStopped",
    "Record",
    "Recycle",
    "Specialize",
    "StartKind",
    "Status",
    "Taint",
    "Timings",
    "TopicSpec",
    "Topics",
    "WorkCommand",
    "decode",
    "encode",
    "new_invocation_id",
    "now_ms",
]

from events.code import (  # noqa: E402 - grouped by family
    ZERO_SHA,
    ArtifactReady,
    BuildFailed,
    BuildFinished,
    BuildStarted,
    CodeCommitted,
)
from events.pool import PrewarmCompleted, PrewarmRequested, PrewarmStarted, RepoConfigured  # noqa: E402

__all__ += [
    "ZERO_SHA",
    "ArtifactReady",
    "BuildFailed",
    "BuildFinished",
    "BuildStarted",
    "CodeCommitted",
    "PrewarmCompleted",
    "PrewarmRequested",
    "PrewarmStarted",
    "RepoConfigured",
]

from events.placement import (  # noqa: E402
    ISOLATED_TOLERATION,
    RUNTIME_TOLERATION,
    PlacementOverride,
    Toleration,
)

__all__ += ["ISOLATED_TOLERATION", "RUNTIME_TOLERATION", "PlacementOverride", "Toleration"]

from events.metrics import InstanceMetrics, NodeMetrics, ThrottleDecided  # noqa: E402
from events.work import Clamp, ConfigureNode  # noqa: E402

__all__ += ["Clamp", "ConfigureNode", "InstanceMetrics", "NodeMetrics", "ThrottleDecided"]

from events.workflow import (  # noqa: E402
    RunEvent,
    RunFinished,
    RunStarted,
    StepFinished,
    StepSpec,
    StepStarted,
    WorkflowSpec,
)

__all__ += ["RunEvent", "RunFinished", "RunStarted", "StepFinished", "StepSpec", "StepStarted", "WorkflowSpec"]

from events.auth import AuditRecorded, TokenIssued, TokenRevoked  # noqa: E402

__all__ += ["AuditRecorded", "TokenIssued", "TokenRevoked"]
