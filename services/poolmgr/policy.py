"""Pure pool policy: generic pool size per node, keep-alive (which idle instances to recycle) and
keep-alive pre-warms (when to load a function again ahead of its expected next invocation).

The keep-alive policy itself (``fixed`` or the learned ``hybrid`` one) lives in
:mod:`services.poolmgr.keepalive`; this module applies its decisions to what the pool manager sees:
the functions' invocation results (:class:`ArrivalBook` learns each function's idle times from
them), node heartbeats (instances to recycle) and the clock (pre-warms). No Kafka, no I/O, no clock
of its own: the caller passes ``now_ms``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from events import FunctionSpec, InvocationCompleted, NodeHeartbeat
from services.poolmgr.keepalive import HybridPolicy, IdleHistogram, KeepAliveDecision, KeepAlivePolicy

__all__ = [
    "ArrivalBook",
    "FunctionArrivals",
    "PoolPolicy",
    "PrewarmDecision",
    "RecycleDecision",
    "effective_decision",
    "generic_target",
    "keepalive_decisions",
    "keepalive_prewarms",
    "loaded_functions",
]


@dataclass(frozen=True)
class PoolPolicy:
    generic_per_node: int = 2
    """Generic instances each runtime node keeps ready."""
    keepalive: KeepAlivePolicy = field(default_factory=HybridPolicy)
    """Keep-alive of functions that set no ``idle_s``: ``fixed`` or the learned ``hybrid`` policy."""


def generic_target(node: NodeHeartbeat, policy: PoolPolicy) -> int:
    """How many generic instances ``node`` should keep: the policy's number, within capacity."""
    return max(0, min(policy.generic_per_node, node.capacity.max_instances))


@dataclass(frozen=True)
class RecycleDecision:
    instance: str
    function: str | None
    reason: str


@dataclass(frozen=True)
class PrewarmDecision:
    """Load one instance of ``function``'s active version now: its next invocation is expected soon."""

    function: str
    window: int
    """End (epoch ms) of the invocation the expected-arrival window counts from: one request per window."""
    reason: str


# --- learning arrivals ----------------------------------------------------------------------------


@dataclass
class FunctionArrivals:
    """What the pool manager learned of one function's invocations."""

    hist: IdleHistogram
    """Idle times between the function's invocations."""
    decision: KeepAliveDecision
    """The policy's decision on ``hist``, as of the latest invocation."""
    last_end_ms: int
    """End (epoch ms) of the latest-ending invocation seen: the keep-alive window counts from it."""
    invocations: int = 1


class ArrivalBook:
    """Per function, the idle-time histogram of its invocations and the policy's current decision.

    Fed with invocation results: a result marks the end of an invocation (``completed_ms``), and its
    ``timings_ms.total`` (from the request's timestamp to the result) dates its arrival. Results seen
    twice (at-least-once delivery) are counted once, as far as the last ``remember_ids`` ids go.
    """

    def __init__(self, policy: KeepAlivePolicy, remember_ids: int = 10_000) -> None:
        self.policy = policy
        self._functions: dict[str, FunctionArrivals] = {}
        self._seen: dict[str, None] = {}  # insertion-ordered: the oldest id is dropped first
        self._remember = remember_ids

    @property
    def functions(self) -> Mapping[str, FunctionArrivals]:
        """What is known per function name."""
        return self._functions

    def record(self, function: str, arrival_ms: int, end_ms: int, invocation_id: str | None = None) -> bool:
        """Note one invocation of ``function``; False (and nothing learned) for an id already seen."""
        if invocation_id is not None:
            if invocation_id in self._seen:
                return False
            self._seen[invocation_id] = None
            if len(self._seen) > self._remember:
                del self._seen[next(iter(self._seen))]
        arrival_ms = min(arrival_ms, end_ms)
        known = self._functions.get(function)
        hist = known.hist if known is not None else self.policy.new_histogram()
        hist.record_arrival(arrival_ms / 1000, (end_ms - arrival_ms) / 1000)
        decision = self.policy.decide(hist)
        if known is None:
            self._functions[function] = FunctionArrivals(hist, decision, end_ms)
        else:
            known.decision = decision
            known.last_end_ms = max(known.last_end_ms, end_ms)
            known.invocations += 1
        return True

    def record_result(self, result: InvocationCompleted) -> bool:
        """:meth:`record` for an invocation result (arrival = completion - total time)."""
        end = result.completed_ms
        return self.record(result.function, end - max(0, round(result.timings_ms.total)), end, result.id)

    def forget(self, functions: Iterable[str]) -> None:
        """Drop what is known of ``functions`` (deleted ones)."""
        for name in functions:
            self._functions.pop(name, None)


# --- decisions ------------------------------------------------------------------------------------


def effective_decision(
    spec: FunctionSpec, learned: FunctionArrivals | None, policy: PoolPolicy, default: KeepAliveDecision | None = None
) -> tuple[str, KeepAliveDecision]:
    """Which policy decides for ``spec`` (a label for reasons) and its decision.

    A function that sets ``idle_s`` keeps its instances that long (a fixed keep-alive, never a
    pre-warm); otherwise the platform policy decides, from what it learned of the function or,
    for a function not invoked since the pool manager started, from an empty histogram
    (``default``, computed here when not given).
    """
    if spec.idle_s is not None:
        return f"idle_s={spec.idle_s:g}", KeepAliveDecision(0.0, spec.idle_s, f"function's idle_s={spec.idle_s:g}")
    if learned is not None:
        return policy.keepalive.name, learned.decision
    if default is None:
        default = policy.keepalive.decide(policy.keepalive.new_histogram())
    return policy.keepalive.name, default


def _secs(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}".removesuffix(".0")


def _window(decision: KeepAliveDecision) -> str:
    return f"window {_secs(decision.prewarm_after_s)}-{_secs(decision.unload_after_s)}s"


def keepalive_decisions(
    node: NodeHeartbeat,
    specs: Mapping[str, FunctionSpec],
    policy: PoolPolicy,
    learned: Mapping[str, FunctionArrivals],
    protected: Collection[tuple[str, str]] = (),
    now_ms: int = 0,
) -> list[RecycleDecision]:
    """Ready instances on ``node`` to recycle, each with the reason (naming the policy that decided).

    An instance of a deleted function or of a version that is no longer active is recycled; one
    the keep-alive decision of its function does not want loaded is too. An instance that served
    invocations is judged by its own idle time (the heartbeat's ``idle_ms``, since its last use).
    One that served none was loaded ahead of demand (a pre-warm): it stays while the function's own
    idle time (since its latest invocation ended, ``now_ms`` minus what ``learned`` holds) is in
    the window, or while its own idle time is (the agent counts that from the instance's start).

    ``protected`` (function, version) pairs are being prewarmed or were just activated: their
    instances hold a version that is not (yet, as far as this view knows) the active one, and
    must not be mistaken for stale ones, nor recycled before they had a chance to serve.
    """
    decisions = []
    default: KeepAliveDecision | None = None
    for inst in node.instances:
        if inst.state != "ready" or inst.function is None:
            continue
        if (inst.function, inst.function_version) in protected:
            continue
        spec = specs.get(inst.function)
        if spec is None:
            decisions.append(RecycleDecision(inst.instance, inst.function, "function deleted"))
            continue
        if spec.code_version != inst.function_version:
            decisions.append(RecycleDecision(inst.instance, inst.function, "holds an old version"))
            continue
        fn = learned.get(inst.function)
        if fn is None and spec.idle_s is None and default is None:
            default = policy.keepalive.decide(policy.keepalive.new_histogram())
        label, decision = effective_decision(spec, fn, policy, default)
        idle_s = inst.idle_ms / 1000
        if inst.uses > 0:
            if decision.wants_loaded(idle_s):
                continue
            reason = f"keep-alive ({label}): idle {_secs(idle_s)}s, {_window(decision)}"
        else:
            since_end_s = (now_ms - fn.last_end_ms) / 1000 if fn is not None else None
            if decision.wants_loaded(idle_s) or (since_end_s is not None and decision.wants_loaded(since_end_s)):
                continue
            function_idle = f", function idle {_secs(since_end_s)}s" if since_end_s is not None else ""
            reason = f"keep-alive ({label}): unused, idle {_secs(idle_s)}s{function_idle}, {_window(decision)}"
        if label == policy.keepalive.name and label != "fixed":
            reason += f" [{decision.reason}]"
        decisions.append(RecycleDecision(inst.instance, inst.function, reason))
    return decisions


LOADED_STATES = frozenset({"specializing", "ready", "busy"})
"""States in which an instance holds (or is being given) its function's code."""


def loaded_functions(nodes: Iterable[NodeHeartbeat], specs: Mapping[str, FunctionSpec]) -> set[str]:
    """Functions with an instance of their active version loaded (or loading) on one of ``nodes``."""
    loaded = set()
    for node in nodes:
        for inst in node.instances:
            if inst.function is None or inst.state not in LOADED_STATES:
                continue
            spec = specs.get(inst.function)
            if spec is not None and spec.code_version == inst.function_version:
                loaded.add(inst.function)
    return loaded


def keepalive_prewarms(
    specs: Mapping[str, FunctionSpec],
    learned: Mapping[str, FunctionArrivals],
    policy: PoolPolicy,
    loaded: Collection[str],
    requested: Mapping[str, int],
    now_ms: int,
) -> list[PrewarmDecision]:
    """Functions to pre-warm now: their decision unloads after use and loads again before the next arrival.

    A function is due when its decision has a pre-warm point (``prewarm_after_s > 0``), the time
    since its latest invocation ended is within the keep-alive window, no instance of its active
    version is ``loaded`` anywhere, and no request was made for this window yet (``requested``:
    function -> :attr:`PrewarmDecision.window` of the last request). A function that sets
    ``idle_s`` is never pre-warmed.
    """
    due = []
    for name, fn in learned.items():
        spec = specs.get(name)
        if spec is None or spec.idle_s is not None:
            continue
        decision = fn.decision
        if decision.prewarm_after_s <= 0 or requested.get(name) == fn.last_end_ms or name in loaded:
            continue
        since_s = (now_ms - fn.last_end_ms) / 1000
        if not decision.wants_loaded(since_s):
            continue
        soonest = max(0.0, decision.prewarm_after_s - since_s)
        latest = decision.unload_after_s - since_s
        reason = (
            f"keep-alive policy: expected arrival in {_secs(soonest)}-{_secs(latest)}s "
            f"({policy.keepalive.name}: idle {_secs(since_s)}s, {_window(decision)}; {decision.reason})"
        )
        due.append(PrewarmDecision(name, fn.last_end_ms, reason))
    return due
