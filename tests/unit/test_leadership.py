"""The pure parts of services.common.leadership: who gets the lease, how acks merge, lease state."""

from __future__ import annotations

import asyncio

import orjson
from aiokafka import TopicPartition
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata

from events import PrewarmRequested, Topics
from services.common.leadership import (
    Ack,
    Claim,
    Consumed,
    Leadership,
    LeaseAssignor,
    Out,
    choose_holder,
    instance_name,
    lease_spec,
    merge_acks,
)


def test_the_current_holder_keeps_the_lease_when_a_standby_joins() -> None:
    claims = {"m-a": Claim("poolmgr-1", held=4), "m-b": Claim("poolmgr-0")}
    assert choose_holder(claims) == "m-a"  # poolmgr-0 sorts first, but poolmgr-1 holds it


def test_with_two_claims_the_later_generation_wins() -> None:
    # A former holder dropped from the group (its session expired) comes back claiming generation 3.
    claims = {"zombie": Claim("poolmgr-0", held=3), "new": Claim("poolmgr-1", held=5), "c": Claim("poolmgr-2")}
    assert choose_holder(claims) == "new"


def test_with_no_holder_the_first_name_gets_it_whoever_joined_first() -> None:
    assert choose_holder({"z-1": Claim("workflow-0"), "a-1": Claim("workflow-1")}) == "z-1"
    assert choose_holder({"b": Claim("same"), "a": Claim("same")}) == "a"  # then the member id
    assert choose_holder({}) is None


def _meta(topics: list[str], user_data: bytes) -> ConsumerProtocolMemberMetadata:
    return ConsumerProtocolMemberMetadata(0, topics, user_data)


class _Cluster:
    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0}


def test_the_assignor_gives_the_lease_partition_to_one_member_only() -> None:
    assignor = LeaseAssignor("poolmgr-0")
    assignor.held = 7
    mine = assignor.metadata(["stoker.lease.poolmgr"])
    assert orjson.loads(mine.user_data) == {"name": "poolmgr-0", "held": 7}
    members = {
        "m-0": mine,
        "m-1": _meta(["stoker.lease.poolmgr"], orjson.dumps({"name": "poolmgr-1", "held": -1})),
        "m-2": _meta(["stoker.lease.poolmgr"], b"not json"),  # an odd member counts as a standby
    }
    out = assignor.assign(_Cluster(), members)
    assert out["m-0"].partitions() == [TopicPartition("stoker.lease.poolmgr", 0)]
    assert out["m-1"].partitions() == [] and out["m-2"].partitions() == []


def test_acks_merge_per_group_and_partition_the_furthest_winning() -> None:
    acks = [
        Ack("g", "t", 0, 5),
        Ack("g", "t", 0, 3),
        Ack("g", "t", 1, 2),
        Ack("h", "t", 0, 1),
    ]
    assert merge_acks(acks) == {
        "g": {TopicPartition("t", 0): 5, TopicPartition("t", 1): 2},
        "h": {TopicPartition("t", 0): 1},
    }
    assert merge_acks([]) == {}


def test_a_consumed_record_acks_the_position_after_it() -> None:
    item = Consumed(
        record=None, reason="bad", group="g", topic="t", partition=2, offset=41, key=None, value=b"", headers=()
    )
    assert item.ack == Ack("g", "t", 2, 42)


def test_names_and_the_lease_topic() -> None:
    assert instance_name({"STOKER_INSTANCE_NAME": "poolmgr-1"}, "poolmgr") == "poolmgr-1"
    assert instance_name({}, "poolmgr").startswith("poolmgr-")
    spec = lease_spec(Topics("p."), "workflow")
    assert (spec.name, spec.partitions) == ("p.lease.workflow", 1)
    assert Out("t", PrewarmRequested(function="f"), "f").headers == ()  # no span: no trace context


def test_the_lease_is_kept_through_a_rebalance_that_gives_it_back_and_lost_when_it_moves() -> None:
    async def scenario() -> None:
        lease = Leadership(
            "127.0.0.1:1", lease_spec(Topics("p."), "poolmgr"), group_id="g", instance="poolmgr-0", transactional_id="x"
        )
        tp = TopicPartition("p.lease.poolmgr", 0)
        await lease.on_partitions_assigned([tp])
        assert lease.holding and not lease._lost.is_set()
        await lease.on_partitions_revoked([tp])  # a standby joins: everything is revoked first
        assert lease.holding  # the term goes on until the rebalance says where the lease went
        await lease.on_partitions_assigned([tp])
        assert lease.holding and not lease._lost.is_set()
        await lease.on_partitions_revoked([tp])
        await lease.on_partitions_assigned([])  # it went to the other copy
        assert not lease.holding and lease._lost.is_set()
        assert lease._assignor.held == -1  # and this copy no longer claims it

    asyncio.run(scenario())
