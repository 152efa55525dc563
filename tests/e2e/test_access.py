"""Who may invoke, deploy and read, over real HTTP: tokens made with `stoker token`, their scopes, revocation,
expiry, rate limits, guessing, public functions, and the principal carried with an invocation."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import stat
import subprocess
import time
import zipfile

from events import AuditRecorded, InvocationRequested
from services.common.client import StokerClient
from tests.e2e.conftest import STOKER, Platform
from tests.helpers import assert_eventually

WRONG = "stk_000000000000_" + "x" * 43


def token(platform: Platform, *args: str) -> str:
    return platform.stoker("token", "create", *args).stdout.strip()


def archive() -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("handler.py", "def main(e):\n    return 'ok'\n")
    return base64.b64encode(buf.getvalue()).decode()


def invocations_of(platform: Platform, function: str) -> int:
    async def count() -> int:
        async with StokerClient(platform.settings) as client:
            history = await client.history(client.topics.invocation)
        return sum(1 for r in history if isinstance(r, InvocationRequested) and r.function == function)

    return asyncio.run(count())


def audit_of(platform: Platform, principal_id: str) -> list[AuditRecorded]:
    async def read() -> list[AuditRecorded]:
        async with StokerClient(platform.settings) as client:
            history = await client.history(client.topics.audit, key=principal_id)
        return [r for r in history if isinstance(r, AuditRecorded)]

    return asyncio.run(read())


def test_the_first_admin_token_is_kept_private_in_the_state_folder(platform: Platform) -> None:
    path = platform.home / "admin-token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert platform.admin_token.startswith("stk_")
    assert platform.admin_token in platform.up_output  # type: ignore[attr-defined]


def test_every_route_but_healthz_needs_a_token(platform: Platform) -> None:
    with platform.client(token="") as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        for method, path in (
            ("POST", "/fn/hello"),
            ("POST", "/async/fn/hello"),
            ("GET", "/invocations/x"),
            ("GET", "/functions"),
            ("GET", "/metrics"),
            ("GET", "/openapi.json"),
            ("GET", "/api/v1/functions"),
            ("POST", "/api/v1/nodes/runtime-0/cordon"),
        ):
            answer = anonymous.request(method, path)
            assert answer.status_code == 401, (method, path, answer.text)
            assert answer.headers["www-authenticate"] == "Bearer"
            assert "Authorization: Bearer" in answer.json()["error"]
        # Git webhooks keep their own HMAC check: no token asked, the signature is.
        assert anonymous.post("/webhooks/git", json={}).status_code in (400, 401)


def test_malformed_unknown_and_url_tokens_are_refused(platform: Platform) -> None:
    with platform.client(token="") as http:
        for header in ("Basic abc", "Bearer", "token abc"):
            answer = http.get("/functions", headers={"Authorization": header})
            assert answer.status_code == 401 and "malformed" in answer.json()["error"], header
        not_ours = http.get("/functions", headers={"Authorization": "Bearer abc"})
        assert not_ours.status_code == 401 and "not a Stoker token" in not_ours.json()["error"]
        unknown = http.get("/functions", headers={"Authorization": f"Bearer {WRONG}"})
        assert unknown.status_code == 401 and unknown.json()["error"] == "unknown token"
        in_url = http.get("/functions", params={"token": platform.admin_token})
        assert in_url.status_code == 401 and "never in the URL" in in_url.json()["error"]
        forged = platform.admin_token[:-4] + "AAAA"
        assert http.get("/functions", headers={"Authorization": f"Bearer {forged}"}).status_code == 401


def test_scopes_decide_what_a_token_may_do(platform: Platform) -> None:
    invoker = token(platform, "--scope", "invoke:hel*", "--name", "invoker")
    reader = token(platform, "--scope", "read")
    deployer = token(platform, "--scope", "deploy:team-*", "--scope", "read")
    with platform.client(invoker) as http:
        served = http.post("/fn/hello", json={"name": "scoped"})
        assert served.status_code == 200, served.text
        ident = served.headers["X-Stoker-Invocation-Id"]
        assert http.get(f"/invocations/{ident}").status_code == 200  # its own result
        assert http.get("/functions").status_code == 403  # no read scope
    with platform.client(deployer) as http:
        made = http.post(
            "/api/v1/functions", json={"name": "team-fn", "entrypoint": "handler:main", "archive": archive()}
        )
        assert made.status_code == 201, made.text
        other = http.post(
            "/api/v1/functions", json={"name": "other-fn", "entrypoint": "handler:main", "archive": archive()}
        )
        assert other.status_code == 403 and "deploy scope on 'other-fn'" in other.json()["error"]
        refused = http.post("/fn/team-fn", json={})
        assert refused.status_code == 403 and "may not invoke 'team-fn'" in refused.json()["error"]
        assert http.post("/api/v1/nodes/runtime-0/cordon").status_code == 403  # nodes are admin's
        assert http.get("/api/v1/tokens").status_code == 403
    assert invocations_of(platform, "team-fn") == 0  # the refused invocation was never published
    trail = [(a.method, a.path, a.status) for a in audit_of(platform, deployer.split("_")[1])]
    assert ("POST", "/api/v1/functions", 201) in trail and ("POST", "/api/v1/functions", 403) in trail
    assert ("POST", "/api/v1/nodes/runtime-0/cordon", 403) in trail
    with platform.client(reader) as http:
        assert http.get("/api/v1/functions/team-fn").status_code == 200
        assert http.get(f"/invocations/{ident}").status_code == 200
        assert http.post("/fn/hello", json={}).status_code == 403
        assert http.patch("/api/v1/functions/hello", json={"memory_mb": 300}).status_code == 403


def test_the_principal_travels_with_the_invocation(platform: Platform) -> None:
    caller = token(platform, "--scope", "invoke:hello", "--scope", "read", "--name", "caller")
    caller_id = caller.split("_")[1]
    with platform.client(caller) as http:
        ident = http.post("/fn/hello", json={}).headers["X-Stoker-Invocation-Id"]
        result = http.get(f"/invocations/{ident}").json()
    assert result["principal"] == caller_id
    out = assert_eventually(
        lambda: (o := platform.stoker("trace", ident, check=False).stdout) and "principal" in o and o, timeout_s=15
    )
    assert caller_id in out


def test_revoked_and_expired_tokens_stop_working(platform: Platform) -> None:
    doomed = token(platform, "--scope", "read", "--name", "doomed")
    brief = token(platform, "--scope", "read", "--expires-in", "2s")
    with platform.client(doomed) as http:
        assert http.get("/functions").status_code == 200
        platform.stoker("token", "revoke", doomed.split("_")[1])
        assert_eventually(lambda: http.get("/functions").status_code == 401, timeout_s=10)
        assert http.get("/functions").json()["error"] == "this token was revoked"
    with platform.client(brief) as http:
        assert http.get("/functions").status_code == 200
        time.sleep(2.5)
        expired = http.get("/functions")
        assert expired.status_code == 401 and expired.json()["error"] == "this token expired"
    listed = platform.stoker("token", "list").stdout
    assert "revoked" in listed and "doomed" in listed
    with platform.client() as admin:
        rows = {row["name"]: row for row in admin.get("/api/v1/tokens").json()}
    assert rows["doomed"]["state"] == "revoked" and "digest" not in rows["admin (stoker up)"]


def test_a_token_over_its_rate_gets_429_with_retry_after(platform: Platform) -> None:
    slow = token(platform, "--scope", "read", "--rate", "2")
    with platform.client(slow) as http:
        answers = [http.get("/functions") for _ in range(6)]
    limited = [a for a in answers if a.status_code == 429]
    assert limited and answers[0].status_code == 200
    assert int(limited[0].headers["retry-after"]) >= 1 and "rate" in limited[0].json()["error"]


def test_guessing_tokens_is_slowed_down(platform: Platform) -> None:
    with platform.client(token="") as http:
        codes = [http.get("/functions", headers={"Authorization": f"Bearer {WRONG}"}).status_code for _ in range(12)]
    assert 401 in codes and 429 in codes, codes


def test_a_public_function_is_invoked_without_a_token(platform: Platform) -> None:
    with platform.client() as admin:
        made = admin.post(
            "/api/v1/functions",
            json={"name": "open-fn", "entrypoint": "handler:main", "archive": archive(), "public": True},
        )
        assert made.status_code == 201, made.text
    with platform.client(token="") as anonymous:
        served = anonymous.post("/fn/open-fn", json={})
        assert served.status_code == 200 and served.json() == "ok"
        assert anonymous.get(f"/invocations/{served.headers['X-Stoker-Invocation-Id']}").status_code == 401
        assert anonymous.post("/fn/hello", json={}).status_code == 401  # hello is not public


def test_the_cli_manages_through_the_api_with_its_token_and_kafka_only_with_direct(platform: Platform) -> None:
    viewer = token(platform, "--scope", "read", "--name", "cli-viewer")
    as_viewer = {**platform.env, "STOKER_TOKEN": viewer}
    listed = subprocess.run([STOKER, "fn", "list", "--json"], env=as_viewer, capture_output=True, text=True)
    assert listed.returncode == 0 and "hello" in listed.stdout
    refused = subprocess.run([STOKER, "fn", "prewarm", "hello"], env=as_viewer, capture_output=True, text=True)
    assert refused.returncode != 0 and "no deploy scope on 'hello'" in refused.stderr
    # The operator's path writes the topics itself, whatever token is in the environment.
    direct = subprocess.run(
        [STOKER, "--direct", "fn", "prewarm", "hello"], env=as_viewer, capture_output=True, text=True
    )
    assert direct.returncode == 0, direct.stderr
    gone = subprocess.run(
        [STOKER, "fn", "list"],
        env={**platform.env, "STOKER_TOKEN": WRONG},
        capture_output=True,
        text=True,
    )
    assert gone.returncode != 0 and "unknown token" in gone.stderr
