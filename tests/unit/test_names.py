"""Unit tests of services.common.names: who owns a name, from the claims' order."""

from __future__ import annotations

from events import codec
from events.names import NameClaimed
from services.common.names import PENDING_S, live_claims, owner


def _rec(offset: int, key: str, claim: NameClaimed | None) -> tuple[int, bytes, bytes | None]:
    return offset, key.encode(), codec.encode(claim) if claim is not None else None


def test_the_earliest_live_claim_owns_the_name() -> None:
    fn, wf = NameClaimed(name="x", kind="function", at_ms=1000), NameClaimed(name="x", kind="workflow", at_ms=1001)
    claims = live_claims([_rec(0, "function/x", fn), _rec(1, "workflow/x", wf)])
    assert owner(claims, "x", lambda _k, _n: False, now=2000) == fn
    # The loser's claim goes; the winner still owns it.
    claims = live_claims([_rec(0, "function/x", fn), _rec(1, "workflow/x", wf), _rec(2, "workflow/x", None)])
    assert owner(claims, "x", lambda _k, _n: False, now=2000) == fn
    # The owner deleted: the name is free again.
    claims = live_claims([_rec(0, "function/x", fn), _rec(1, "function/x", None)])
    assert owner(claims, "x", lambda _k, _n: False, now=2000) is None


def test_a_repeated_claim_keeps_its_first_place() -> None:
    fn, wf = NameClaimed(name="x", kind="function", at_ms=0), NameClaimed(name="x", kind="workflow", at_ms=0)
    claims = live_claims([_rec(0, "function/x", fn), _rec(1, "workflow/x", wf), _rec(2, "function/x", fn)])
    assert owner(claims, "x", lambda _k, _n: True, now=0) == fn


def test_a_stale_claim_without_a_spec_holds_the_name_only_while_pending() -> None:
    stale = NameClaimed(name="x", kind="workflow", at_ms=0)  # its creator crashed before writing the spec
    fn = NameClaimed(name="x", kind="function", at_ms=0)
    claims = live_claims([_rec(0, "workflow/x", stale), _rec(1, "function/x", fn)])

    def specs(kind: str, _name: str) -> bool:
        return kind == "function"

    assert owner(claims, "x", specs, now=1000) == stale  # still pending: its creator may be writing it
    assert owner(claims, "x", specs, now=int(PENDING_S * 1000) + 1) == fn


def test_claims_of_other_names_and_bad_records_are_ignored() -> None:
    other = NameClaimed(name="y", kind="workflow", at_ms=0)
    claims = live_claims([_rec(0, "workflow/y", other), (1, b"function/x", b"not json"), (2, None, b"{}")])
    assert owner(claims, "x", lambda _k, _n: True, now=0) is None
    assert owner(claims, "y", lambda _k, _n: True, now=0) == other
