"""From git push to prewarmed code, through the platform like a user: webhook, build, prewarm, invoke."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import orjson
import pytest

from services.gateway.webhooks import sign
from tests.e2e.conftest import Platform, processes_under, start_platform
from tests.gitrepo import Repo, make_wheel
from tests.helpers import assert_eventually

SECRET = "e2e-secret"
HANDLER = (
    "import tinydep\n\nCALLS = 0\n\ndef main(event):\n    global CALLS\n    CALLS += 1\n"
    "    return {{'v': {v}, 'dep': tinydep.ANSWER, 'calls': CALLS}}\n"
)


@pytest.fixture(scope="module")
def git_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Platform, Repo]]:
    root = tmp_path_factory.mktemp("git")
    wheels = root / "wheels"
    make_wheel(wheels, "tinydep", "0.1", "ANSWER = 42\n")
    repo = Repo(root / "repo")
    repo.commit(
        {
            "fns/hello/handler.py": HANDLER.format(v=1),
            "fns/hello/requirements.txt": "tinydep==0.1\n",
            "fns/other/handler.py": "def main(e):\n    return 0\n",
        }
    )
    repo.push()
    home = root / "home"
    platform, _ = start_platform(
        home,
        "--no-example",
        env_extra={
            "STOKER_WEBHOOK_SECRET": SECRET,
            "STOKER_PIP_ARGS": f"--no-index --find-links {wheels}",
        },
    )
    try:
        yield platform, repo
    finally:
        platform.stoker("down", check=False)
        assert not processes_under(home), "processes left after `stoker down`"


def github_push(
    platform: Platform, repo: Repo, after: str, changed: list[str], delivery: str, secret: str = SECRET
) -> httpx.Response:
    body = json.dumps(
        {
            "ref": "refs/heads/main",
            "before": "0" * 40,
            "after": after,
            "repository": {"clone_url": repo.url, "full_name": "tests/repo"},
            "commits": [{"id": after, "added": [], "modified": changed, "removed": []}],
        }
    ).encode()
    headers = {
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": delivery,
        "X-Hub-Signature-256": sign(secret, body),
        "Content-Type": "application/json",
    }
    return httpx.post(f"{platform.http}/webhooks/git", content=body, headers=headers, timeout=30)


def active_version(platform: Platform, name: str) -> str | None:
    fn = platform.status()["functions"].get(name)
    return fn["active_version"] if fn else None


def builds(platform: Platform, name: str) -> list[dict]:  # type: ignore[type-arg]
    return orjson.loads(platform.stoker("fn", "builds", name, "--json").stdout)  # type: ignore[no-any-return]


def test_push_builds_prewarms_and_the_first_call_is_prewarmed(git_platform: tuple[Platform, Repo]) -> None:
    platform, repo = git_platform
    platform.stoker(
        "fn",
        "create",
        "hello-git",
        "--git",
        repo.url,
        "--branch",
        "main",
        "--path",
        "fns/hello",
        "--entrypoint",
        "handler:main",
    )
    first_head = repo.commit({"fns/hello/README": "v1 docs"})  # not pushed yet: the build uses the remote head
    assert_eventually(lambda: active_version(platform, "hello-git"), timeout_s=60, message="first build active")
    with platform.client() as http:
        first = http.post("/fn/hello-git", json={})
        assert first.status_code == 200 and first.json()["v"] == 1 and first.json()["dep"] == 42

        # A new commit is pushed and GitHub delivers the webhook.
        repo.push()
        new = repo.commit({"fns/hello/handler.py": HANDLER.format(v=2)})
        repo.push()
        assert new != first_head
        accepted = github_push(platform, repo, new, ["fns/hello/handler.py"], "delivery-2")
        assert accepted.status_code == 202, accepted.text
        again = github_push(platform, repo, new, ["fns/hello/handler.py"], "delivery-2")
        assert again.status_code == 200 and again.json()["status"] == "duplicate"
        forged = github_push(platform, repo, new, ["fns/hello/handler.py"], "delivery-3", secret="wrong")
        assert forged.status_code == 401

        assert_eventually(
            lambda: active_version(platform, "hello-git") == new[:12],
            timeout_s=60,
            message="the new commit became active after its prewarm",
        )
        served = http.post("/fn/hello-git", json={})
        assert served.status_code == 200, served.text
        assert served.json() == {"v": 2, "dep": 42, "calls": 1}
        assert served.headers["x-stoker-start"] == "prewarmed"
        inv_id = served.headers["x-stoker-invocation-id"]

    # Exactly one build for the delivery (the duplicate and the forged one built nothing).
    ok_builds = [b for b in builds(platform, "hello-git") if b.get("commit") == new]
    assert len(ok_builds) == 1 and ok_builds[0]["status"] == "ok"
    log = platform.stoker("fn", "logs", "hello-git", "--build", ok_builds[0]["build"]).stdout
    assert "tinydep" in log and new in log

    def linked() -> str:
        out = platform.stoker("trace", inv_id, check=False).stdout
        wanted = ("start=prewarmed", "linked trace", "POST /webhooks/git", "stoker build", "stoker specialize")
        return out if all(w in out for w in wanted) else ""

    assert_eventually(linked, timeout_s=15, message="the invocation's trace links to the build trace")

    # The console shows the same: the function's git source and build (with its log), and the
    # invocation's linked build trace.
    console = f"http://127.0.0.1:{platform.env['STOKER_CONSOLE_PORT']}/console/api"
    admin = {"Authorization": f"Bearer {platform.admin_token}"}
    shown = {f["name"]: f for f in httpx.get(f"{console}/functions", timeout=30, headers=admin).json()}["hello-git"]
    assert shown["source"]["kind"] == "git" and shown["source"]["git_commit"] == new
    build = next(b for b in shown["builds"] if b["commit"] == new)
    assert build["status"] == "ok" and build["has_log"]
    build_log = httpx.get(f"{console}/functions/hello-git/builds/{build['build']}/log", timeout=30, headers=admin)
    assert build_log.status_code == 200 and "tinydep" in build_log.text
    page = httpx.get(f"{console}/invocations/{inv_id}", timeout=30, headers=admin).json()
    assert page["result"]["start"] == "prewarmed"
    linked_spans = {s["name"] for t in page["linked"] for s in t["spans"]}
    assert {"stoker build", "stoker specialize"} <= linked_spans, linked_spans


def test_bad_pushes_keep_the_previous_version_serving(git_platform: tuple[Platform, Repo]) -> None:
    platform, repo = git_platform
    assert_eventually(lambda: active_version(platform, "hello-git"), timeout_s=60)
    before = active_version(platform, "hello-git")
    count = len(builds(platform, "hello-git"))

    # A push that touches no bound path is acknowledged and builds nothing.
    other = repo.commit({"fns/other/handler.py": "def main(e):\n    return 1\n"})
    repo.push()
    assert github_push(platform, repo, other, ["fns/other/handler.py"], "delivery-other").status_code == 202

    # Code that fails on import: the build succeeds, the prewarm fails, the old version stays active.
    broken = repo.commit({"fns/hello/handler.py": "def main(event:\n"})
    repo.push()
    assert github_push(platform, repo, broken, ["fns/hello/handler.py"], "delivery-broken").status_code == 202
    assert_eventually(
        lambda: any(b.get("commit") == broken and b.get("status") == "ok" for b in builds(platform, "hello-git")),
        timeout_s=60,
    )
    out = assert_eventually(
        lambda: (
            (o := platform.stoker("monitor", "prewarm", "--from-beginning", "--duration", "3").stdout)
            and "status=failed" in o
            and o
        ),
        timeout_s=30,
    )
    assert "SyntaxError" in out
    assert active_version(platform, "hello-git") == before
    assert len(builds(platform, "hello-git")) == count + 1  # the unbound push built nothing
    with platform.client() as http:
        assert http.post("/fn/hello-git", json={}).json()["v"] == 2

    ping = httpx.post(
        f"{platform.http}/webhooks/git",
        content=b"{}",
        timeout=10,
        headers={"X-GitHub-Event": "ping", "X-GitHub-Delivery": "p1", "X-Hub-Signature-256": sign(SECRET, b"{}")},
    )
    assert ping.status_code == 200 and ping.json()["status"] == "pong"
