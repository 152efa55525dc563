"""One registry of invocable names: a name is a function or a workflow, never both.

Kafka has no compare-and-set, so a name is claimed by writing ``name.claimed`` to the
one-partition compacted ``name`` topic (key ``<kind>/<name>``) and reading it back: the live
claim with the lowest offset owns the name, which every reader of that partition agrees on.
A creator that finds it lost removes its own claim and is refused; only the owner writes its
spec, so two concurrent creates of one name under two kinds end with exactly one of them.

A claim left behind by a creator that crashed before writing its spec does not hold a name
for ever: it counts only while its kind's spec exists, or for ``PENDING_S`` after it was made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from events import codec, now_ms
from events.names import NameClaimed
from services.common.kafkasec import client_options as kafka_client_options

Kind = Literal["function", "workflow"]
PENDING_S = 60.0
"""How long a claim without its spec still holds the name (its creator is writing the spec)."""


class NameTaken(Exception):
    """The name belongs to an invocable of the other kind."""


@dataclass(frozen=True)
class Claim:
    offset: int
    claim: NameClaimed


def claim_key(kind: str, name: str) -> str:
    return f"{kind}/{name}"


def live_claims(records: Iterable[tuple[int, bytes | None, bytes | None]]) -> dict[str, Claim]:
    """The live claim per key from the topic's records (offset, key, value), in offset order."""
    live: dict[str, Claim] = {}
    for offset, key, value in records:
        if key is None:
            continue
        name = key.decode("utf-8", errors="replace")
        if not value:
            live.pop(name, None)
            continue
        try:
            record = codec.decode(value, (NameClaimed,))
        except codec.DecodeError:
            continue
        assert isinstance(record, NameClaimed)
        if name not in live:  # a repeated claim keeps its first place
            live[name] = Claim(offset, record)
    return live


def owner(
    claims: dict[str, Claim], name: str, has_spec: Callable[[str, str], bool], now: int | None = None
) -> NameClaimed | None:
    """Who owns ``name``: the live claim with the lowest offset that is backed by a spec or still pending."""
    now = now_ms() if now is None else now
    candidates = []
    for claim in claims.values():
        c = claim.claim
        if c.name != name:
            continue
        if has_spec(c.kind, name) or now - c.at_ms < PENDING_S * 1000:
            candidates.append(claim)
    if not candidates:
        return None
    return min(candidates, key=lambda c: c.offset).claim


async def read_claims(bootstrap: str, topic: str) -> dict[str, Claim]:
    """Every live claim on the (one-partition) name topic, read to its end now."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        **kafka_client_options(),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        records: list[tuple[int, bytes | None, bytes | None]] = []
        if end:
            await consumer.seek_to_beginning(tp)
            while await consumer.position(tp) < end:
                batches = await consumer.getmany(tp, timeout_ms=200)
                records.extend((r.offset, r.key, r.value) for r in batches.get(tp, []) if r.offset < end)
        return live_claims(records)
    finally:
        await consumer.stop()


async def claim(
    producer: AIOKafkaProducer,
    bootstrap: str,
    topic: str,
    name: str,
    kind: Kind,
    has_spec: Callable[[str, str], bool],
) -> None:
    """Make sure ``name`` is ``kind``'s, or raise :class:`NameTaken` (and leave no claim behind)."""
    other = "workflow" if kind == "function" else "function"
    if has_spec(other, name):
        raise NameTaken(f"{name!r} is already a {other}; a {kind} needs a name of its own")
    claims = await read_claims(bootstrap, topic)
    wrote = False
    if claim_key(kind, name) not in claims:
        record = NameClaimed(name=name, kind=kind)
        await producer.send_and_wait(topic, codec.encode(record), key=claim_key(kind, name).encode(), partition=0)
        wrote = True
        claims = await read_claims(bootstrap, topic)
    holder = owner(claims, name, has_spec)
    if holder is not None and holder.kind != kind:
        if wrote:
            await producer.send_and_wait(topic, None, key=claim_key(kind, name).encode(), partition=0)
        raise NameTaken(f"{name!r} is already a {holder.kind}; a {kind} needs a name of its own")


async def release(producer: AIOKafkaProducer, topic: str, name: str, kind: Kind) -> None:
    """The invocable was deleted: its name is free."""
    await producer.send_and_wait(topic, None, key=claim_key(kind, name).encode(), partition=0)
