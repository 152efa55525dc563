"""Tokens, scopes and rate limits (services.common.auth), without a broker."""

from __future__ import annotations

import pytest

from events import TokenIssued, TokenRevoked
from services.common import auth

NOW = 1_800_000_000_000


def issued(token: str, ident: str, scopes: list[str], **extra: object) -> TokenIssued:
    return TokenIssued(id=ident, scopes=scopes, digest=auth.digest_of(token), **extra)  # type: ignore[arg-type]


def test_new_tokens_are_random_well_formed_and_only_their_digest_is_kept() -> None:
    token, ident, digest = auth.new_token()
    other, _, _ = auth.new_token()
    assert token != other and auth.TOKEN.match(token) and token.split("_")[1] == ident
    assert digest == auth.digest_of(token) and token not in digest and len(digest) == 64


def test_verify_knows_valid_unknown_forged_revoked_and_expired_tokens() -> None:
    token, ident, _ = auth.new_token()
    rows: dict[str, TokenIssued | TokenRevoked] = {ident: issued(token, ident, ["read"], name="ci")}
    principal = auth.verify(token, rows.get, NOW)
    assert principal.id == ident and principal.can_read() and principal.label() == f"{ident} (ci)"
    forged = token[:-3] + ("aaa" if not token.endswith("aaa") else "bbb")
    for bad, reason in (
        ("nope", "not a Stoker token (stk_<id>_<secret>)"),
        (forged, "unknown token"),
        (auth.new_token()[0], "unknown token"),
    ):
        with pytest.raises(auth.AuthError) as caught:
            auth.verify(bad, rows.get, NOW)
        assert caught.value.status == 401 and caught.value.message == reason
    rows[ident] = issued(token, ident, ["read"], expires_ms=NOW)
    with pytest.raises(auth.AuthError, match="expired"):
        auth.verify(token, rows.get, NOW)
    rows[ident] = TokenRevoked(id=ident)
    with pytest.raises(auth.AuthError, match="revoked"):
        auth.verify(token, rows.get, NOW)


def test_scopes_match_names_by_glob_and_admin_covers_all() -> None:
    p = auth.Principal("i", "", ("invoke:orders-*", "deploy:team-?"), None)
    assert p.can_invoke("orders-eu") and not p.can_invoke("billing")
    assert p.can_deploy("team-a") and not p.can_deploy("team-ab") and not p.can_read() and not p.admin
    admin = auth.Principal("a", "", ("admin",), None)
    assert admin.can_invoke("x") and admin.can_deploy("y") and admin.can_read()


def test_scopes_are_checked_when_a_token_is_made() -> None:
    assert auth.check_scopes(["read", "invoke:a*", "deploy:b-[0-9]"])
    for bad in ([], ["write"], ["invoke:"], ["invoke:a b"], ["admin:x"]):
        with pytest.raises(ValueError):
            auth.check_scopes(bad)


@pytest.mark.parametrize("header", [None, "", "Basic x", "Bearer", "bearer   "])
def test_a_missing_or_malformed_authorization_header_is_401(header: str | None) -> None:
    with pytest.raises(auth.AuthError) as caught:
        auth.bearer(header)
    assert caught.value.status == 401


def test_bearer_takes_the_token() -> None:
    assert auth.bearer("Bearer stk_x") == "stk_x" and auth.bearer("bearer  stk_y ") == "stk_y"


def test_rate_limits_per_key_with_retry_after() -> None:
    now = [0.0]
    limits = auth.RateLimits(2.0, clock=lambda: now[0])
    limits.take("a")
    limits.take("a")
    with pytest.raises(auth.AuthError) as caught:
        limits.take("a")
    assert caught.value.status == 429 and caught.value.retry_after_s == 0.5
    limits.take("b")  # another key has its own bucket
    now[0] += 0.5
    limits.take("a")  # refilled
    for _ in range(100):
        limits.take("a", per_s=0)  # 0: no limit


def test_rate_limits_forget_the_least_recent_keys() -> None:
    limits = auth.RateLimits(1.0, max_keys=2, clock=lambda: 0.0)
    limits.take("a")
    limits.take("b")
    limits.take("c")  # "a" is forgotten: a fresh bucket
    limits.take("a")
