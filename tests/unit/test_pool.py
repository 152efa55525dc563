"""Unit tests of services.agent.pool: start plans, generic deficit, local recycling limits."""

from __future__ import annotations

import pytest

from services.agent.pool import InstanceFacts, RecyclePolicy, StartPlan, due_for_recycling, generic_deficit, plan_start

FN, VER = "hello", "v2"


def ready(
    i: str, fn: str = FN, ver: str = VER, *, idle_ms: int = 0, prewarmed: bool = False, uses: int = 1, age_ms: int = 0
) -> InstanceFacts:
    return InstanceFacts(i, "ready", fn, ver, uses=uses, idle_ms=idle_ms, age_ms=age_ms, prewarmed=prewarmed)


def generic(i: str, idle_ms: int = 0) -> InstanceFacts:
    return InstanceFacts(i, "generic", idle_ms=idle_ms)


def busy(i: str, fn: str = FN, ver: str = VER) -> InstanceFacts:
    return InstanceFacts(i, "busy", fn, ver, uses=1)


def plan(instances, max_instances: int = 8, starting: int = 0) -> StartPlan:
    return plan_start(instances, FN, VER, max_instances=max_instances, starting=starting)


def test_warm_takes_most_recently_used() -> None:
    instances = [ready("old", idle_ms=9_000), ready("recent", idle_ms=10), ready("mid", idle_ms=500), generic("g")]
    assert plan(instances) == StartPlan("warm", "recent")


def test_warm_preferred_over_prewarmed() -> None:
    instances = [ready("pre", prewarmed=True, uses=0, idle_ms=0), ready("used", idle_ms=60_000)]
    assert plan(instances) == StartPlan("warm", "used")


def test_prewarmed_when_no_used_instance() -> None:
    instances = [generic("g"), ready("pre1", prewarmed=True, uses=0), ready("pre2", prewarmed=True, uses=0)]
    assert plan(instances) == StartPlan("prewarmed", "pre1")


def test_ready_of_other_version_or_function_is_not_warm() -> None:
    instances = [ready("old", ver="v1"), ready("other", fn="other"), generic("g")]
    assert plan(instances) == StartPlan("pool", "g")


def test_busy_instance_is_not_warm() -> None:
    assert plan([busy("b"), generic("g")]) == StartPlan("pool", "g")


def test_pool_takes_longest_idle_generic() -> None:
    instances = [generic("g1", idle_ms=100), generic("g2", idle_ms=5_000), generic("g3", idle_ms=50)]
    assert plan(instances) == StartPlan("pool", "g2")


def test_pool_prefers_a_reset_instance_most_recently_used() -> None:
    instances = [
        generic("spare", idle_ms=9_000),
        InstanceFacts("reset-old", "generic", uses=3, idle_ms=5_000),
        InstanceFacts("reset-new", "generic", uses=1, idle_ms=10),
    ]
    assert plan(instances) == StartPlan("pool", "reset-new")


def test_start_when_room() -> None:
    assert plan([busy("b1"), busy("b2")], max_instances=3) == StartPlan("start")
    assert plan([], max_instances=1) == StartPlan("start")


def test_starting_instances_count_against_capacity() -> None:
    assert plan([busy("b1")], max_instances=3, starting=1) == StartPlan("start")
    assert plan([busy("b1")], max_instances=3, starting=2) == StartPlan("wait")


def test_evict_longest_idle_other_function_when_full() -> None:
    instances = [
        busy("b"),
        ready("x", fn="other", idle_ms=100),
        ready("y", fn="third", idle_ms=7_000),
        ready("z", ver="v1", idle_ms=50),
    ]
    assert plan(instances, max_instances=4) == StartPlan("evict", "y")


def test_evict_old_version_of_same_function() -> None:
    instances = [busy("b"), ready("old", ver="v1", idle_ms=10)]
    assert plan(instances, max_instances=2) == StartPlan("evict", "old")


def test_wait_when_all_busy() -> None:
    instances = [busy("b1"), busy("b2"), InstanceFacts("s", "specializing", FN, VER)]
    assert plan(instances, max_instances=3) == StartPlan("wait")


def test_wait_when_full_with_starting() -> None:
    assert plan([], max_instances=2, starting=2) == StartPlan("wait")


@pytest.mark.parametrize(
    "instances,target,max_instances,starting,expected",
    [
        ([], 2, 8, 0, 2),
        ([generic("g")], 2, 8, 0, 1),
        ([generic("g1"), generic("g2")], 2, 8, 0, 0),
        ([generic("g1"), generic("g2"), generic("g3")], 2, 8, 0, 0),  # never negative
        ([], 2, 8, 1, 1),  # one is already starting
        ([busy("b1"), busy("b2"), busy("b3")], 2, 4, 0, 1),  # capacity leaves room for one
        ([busy("b1"), busy("b2"), busy("b3"), busy("b4")], 2, 4, 0, 0),  # full
        ([busy("b1")], 3, 4, 2, 1),  # room 1 after the two starting ones
        ([], 0, 8, 0, 0),
        ([], 5, 2, 0, 2),
    ],
)
def test_generic_deficit(instances, target: int, max_instances: int, starting: int, expected: int) -> None:
    assert generic_deficit(instances, target=target, max_instances=max_instances, starting=starting) == expected


def test_due_for_recycling_max_invocations() -> None:
    policy = RecyclePolicy(max_invocations=3)
    assert due_for_recycling(ready("r", uses=2), policy) is None
    reason = due_for_recycling(ready("r", uses=3), policy)
    assert reason == "served max_invocations=3"


def test_due_for_recycling_max_age() -> None:
    policy = RecyclePolicy(max_age_s=1.5)
    assert due_for_recycling(ready("r", age_ms=1_499), policy) is None
    assert due_for_recycling(ready("r", age_ms=1_500), policy) == "older than max_age_s=1.5"


def test_due_for_recycling_invocations_checked_first() -> None:
    policy = RecyclePolicy(max_invocations=1, max_age_s=1.0)
    assert due_for_recycling(ready("r", uses=5, age_ms=10_000), policy) == "served max_invocations=1"


def test_due_for_recycling_only_idle_ready_instances() -> None:
    policy = RecyclePolicy(max_invocations=1, max_age_s=1.0)
    assert due_for_recycling(InstanceFacts("b", "busy", FN, VER, uses=9, age_ms=99_999), policy) is None
    assert due_for_recycling(InstanceFacts("g", "generic", age_ms=99_999), policy) is None


def test_due_for_recycling_no_limits() -> None:
    assert due_for_recycling(ready("r", uses=10**6, age_ms=10**9), RecyclePolicy()) is None
