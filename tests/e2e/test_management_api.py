"""The management API (``/api/v1``) over real HTTP against a running platform: functions from an uploaded
archive and from git, builds and logs, workflows and runs, nodes, invocations, and its 4xx answers."""

from __future__ import annotations

import base64
import io
import zipfile
from pathlib import Path

from tests.e2e.conftest import Platform
from tests.gitrepo import Repo
from tests.helpers import assert_eventually

HANDLER = "def main(event):\n    print('saw', event)\n    return {'v': VERSION, 'got': event}\n"
FLOW = """
steps:
  - id: one
    function: api-fn
    input: {n: 1}
  - id: two
    function: api-fn
    after: [one]
    input: {n: $.steps.one.output.got.n}
"""


def archive(version: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("handler.py", HANDLER.replace("VERSION", str(version)))
    return buf.getvalue()


def test_the_openapi_document_lists_the_management_routes(platform: Platform) -> None:
    with platform.client() as http:
        paths = http.get("/openapi.json").json()["paths"]
    for path in (
        "/api/v1/functions",
        "/api/v1/functions/{name}",
        "/api/v1/functions/{name}/archive",
        "/api/v1/functions/{name}/builds",
        "/api/v1/functions/{name}/logs",
        "/api/v1/workflows/{name}",
        "/api/v1/runs/{run_id}",
        "/api/v1/nodes",
        "/api/v1/nodes/{name}/{action}",
        "/api/v1/invocations/{invocation_id}",
    ):
        assert path in paths, path
    assert "application/zip" in paths["/api/v1/functions/{name}/archive"]["put"]["requestBody"]["content"]


def test_a_function_from_an_uploaded_archive_lives_and_dies_through_the_api(platform: Platform) -> None:
    with platform.client() as http:
        created = http.post(
            "/api/v1/functions",
            json={
                "name": "api-fn",
                "entrypoint": "handler:main",
                "archive": base64.b64encode(archive(1)).decode(),
                "timeout_s": 5,
                "memory_mb": 128,
            },
        )
        assert created.status_code == 201, created.text
        spec = created.json()
        assert spec["source"]["kind"] == "archive" and spec["timeout_s"] == 5 and spec["revision"] == 1
        assert http.post("/fn/api-fn", json={"x": 1}).json() == {"v": 1, "got": {"x": 1}}

        again = http.post(
            "/api/v1/functions",
            json={"name": "api-fn", "entrypoint": "handler:main", "archive": base64.b64encode(archive(1)).decode()},
        )
        assert again.status_code == 409 and "exists" in again.json()["error"]

        changed = http.patch("/api/v1/functions/api-fn", json={"memory_mb": 200, "env": {"A": "b"}})
        assert changed.status_code == 200 and changed.json()["revision"] == 2 and changed.json()["memory_mb"] == 200
        code = http.put(
            "/api/v1/functions/api-fn/archive", content=archive(2), headers={"Content-Type": "application/zip"}
        )
        assert code.status_code == 200 and code.json()["revision"] == 3
        assert code.json()["source"]["digest"] != spec["source"]["digest"]
        assert_eventually(lambda: http.post("/fn/api-fn", json={}).json()["v"] == 2, timeout_s=30)

        listed = {f["name"]: f for f in http.get("/api/v1/functions").json()}
        assert listed["api-fn"]["revision"] == 3 and listed["api-fn"]["env"] == {"A": "b"}
        assert http.get("/api/v1/functions/api-fn").json()["memory_mb"] == 200

        logs = assert_eventually(lambda: http.get("/api/v1/functions/api-fn/logs", params={"last": 5}).json())
        assert any("saw" in (entry["logs"] or "") for entry in logs)

        served = http.post("/fn/api-fn", json={"find": "me"})
        ident = served.headers["X-Stoker-Invocation-Id"]
        found = assert_eventually(lambda: http.get(f"/api/v1/invocations/{ident}").json()["id"] == ident)
        assert found
        result = http.get(f"/api/v1/invocations/{ident}").json()
        assert result["status"] == "ok" and result["output"]["got"] == {"find": "me"}

        assert http.post("/api/v1/functions/api-fn/prewarm", json={"count": 2}).status_code == 202
        assert http.put("/api/v1/functions/api-fn/isolation", json={"seconds": 60}).status_code == 202
        assert "api-fn" in platform.status()["isolations"]
        assert http.delete("/api/v1/functions/api-fn/isolation").status_code == 204
        assert "api-fn" not in platform.status()["isolations"]

        assert http.delete("/api/v1/functions/api-fn").status_code == 204
        assert http.get("/api/v1/functions/api-fn").status_code == 404


def test_a_git_function_is_built_and_its_build_log_read_through_the_api(platform: Platform, tmp_path: Path) -> None:
    repo = Repo(tmp_path / "repo")
    repo.commit({"fns/g/handler.py": "def main(e):\n    return 'from git'\n"})
    repo.push()
    with platform.client() as http:
        created = http.post(
            "/api/v1/functions",
            json={
                "name": "api-git",
                "entrypoint": "handler:main",
                "git": {"url": repo.url, "branch": "main", "path": "fns/g"},
            },
        )
        assert created.status_code == 201, created.text
        builds = assert_eventually(
            lambda: [b for b in http.get("/api/v1/functions/api-git/builds").json() if b["status"] == "ok"],
            timeout_s=90,
        )
        log = http.get(f"/api/v1/functions/api-git/builds/{builds[0]['build']}/log")
        assert log.status_code == 200 and log.text
        assert_eventually(lambda: http.post("/fn/api-git", json={}).json() == "from git", timeout_s=60)
        assert http.get("/api/v1/functions/api-git/builds/nope/log").status_code == 404


def test_workflows_and_their_runs_through_the_api(platform: Platform) -> None:
    with platform.client() as http:
        fn = http.post(
            "/api/v1/functions",
            json={"name": "api-fn", "entrypoint": "handler:main", "archive": base64.b64encode(archive(3)).decode()},
        )
        assert fn.status_code == 201, fn.text
        bad = http.post("/api/v1/workflows/api-flow", content="steps:\n  - id: x\n    function: nowhere\n")
        assert bad.status_code == 400
        assert any(p["line"] == 3 and "nowhere" in p["reason"] for p in bad.json()["problems"]), bad.json()
        created = http.post("/api/v1/workflows/api-flow", content=FLOW, headers={"Content-Type": "application/yaml"})
        assert created.status_code == 201, created.text
        assert http.post("/api/v1/workflows/api-flow", content=FLOW).status_code == 409
        assert http.put("/api/v1/workflows/api-flow", content=FLOW).json()["revision"] == 2
        assert http.put("/api/v1/workflows/nobody", content=FLOW).status_code == 404
        assert http.post("/api/v1/workflows/api-fn", content=FLOW).status_code == 409  # a function's name
        assert [w["name"] for w in http.get("/api/v1/workflows").json()] == ["api-flow"]

        ran = http.post("/fn/api-flow", json={})
        assert ran.status_code == 200, ran.text
        run_id = ran.headers["X-Stoker-Invocation-Id"]
        runs = assert_eventually(lambda: http.get("/api/v1/workflows/api-flow/runs").json())
        assert runs[-1]["run"] == run_id and runs[-1]["status"] == "ok"
        steps = http.get(f"/api/v1/runs/{run_id}").json()
        assert steps["status"] == "ok" and [s["step"] for s in steps["steps"]] == ["one", "two"]
        assert http.get("/api/v1/runs/no-such-run").status_code == 404
        assert http.delete("/api/v1/workflows/api-flow").status_code == 204
        assert http.get("/api/v1/workflows/api-flow").status_code == 404


def test_nodes_are_labelled_tainted_cordoned_and_drained_through_the_api(platform: Platform) -> None:
    def node(name: str) -> dict:  # type: ignore[type-arg]
        return {n["node"]: n for n in platform.client().get("/api/v1/nodes").json()}[name]

    with platform.client() as http:
        assert node("runtime-1")["up"] is True
        assert http.post("/api/v1/nodes/runtime-1/labels", json={"set": {"disk": "ssd"}}).status_code == 202
        assert_eventually(lambda: node("runtime-1")["labels"].get("disk") == "ssd", timeout_s=15)
        assert http.post("/api/v1/nodes/runtime-1/labels", json={"remove": ["disk"]}).status_code == 202
        assert_eventually(lambda: "disk" not in node("runtime-1")["labels"], timeout_s=15)
        taint = {"key": "gpu", "value": "yes", "effect": "NoSchedule"}
        assert http.post("/api/v1/nodes/runtime-1/taints", json={"add": [taint]}).status_code == 202
        assert_eventually(lambda: any(t["key"] == "gpu" for t in node("runtime-1")["taints"]), timeout_s=15)
        assert http.post("/api/v1/nodes/runtime-1/taints", json={"remove": ["gpu"]}).status_code == 202
        assert_eventually(lambda: all(t["key"] != "gpu" for t in node("runtime-1")["taints"]), timeout_s=15)
        assert http.post("/api/v1/nodes/runtime-1/cordon").status_code == 202
        assert_eventually(lambda: node("runtime-1")["unschedulable"] is True, timeout_s=15)
        assert http.post("/api/v1/nodes/runtime-1/uncordon").status_code == 202
        assert_eventually(lambda: node("runtime-1")["unschedulable"] is False, timeout_s=15)


def test_bad_management_requests_get_a_clear_4xx(platform: Platform) -> None:
    with platform.client() as http:
        both = http.post(
            "/api/v1/functions", json={"name": "x", "entrypoint": "h:m", "archive": "", "git": {"url": "file:///x"}}
        )
        assert both.status_code == 400 and "exactly one" in both.json()["error"]
        not_b64 = http.post("/api/v1/functions", json={"name": "x", "entrypoint": "h:m", "archive": "%%%"})
        assert not_b64.status_code == 400 and "base64" in not_b64.json()["error"]
        not_zip = http.post(
            "/api/v1/functions",
            json={"name": "x", "entrypoint": "h:m", "archive": base64.b64encode(b"not a zip").decode()},
        )
        assert not_zip.status_code == 400 and "zip" in not_zip.json()["error"]
        bad_name = http.post(
            "/api/v1/functions",
            json={"name": "Bad Name!", "entrypoint": "h:m", "archive": base64.b64encode(archive(1)).decode()},
        )
        assert bad_name.status_code == 400
        unknown_field = http.post("/api/v1/functions", json={"name": "x", "entrypoint": "h:m", "colour": "red"})
        assert unknown_field.status_code == 422
        assert http.patch("/api/v1/functions/nobody", json={"memory_mb": 300}).status_code == 404
        assert http.patch("/api/v1/functions/hello", json={}).status_code == 400
        assert http.patch("/api/v1/functions/hello", json={"memory_mb": 1}).status_code == 400
        wrong_type = http.put("/api/v1/functions/hello/archive", content=archive(1))
        assert wrong_type.status_code == 415
        too_big = http.put(
            "/api/v1/functions/hello/archive",
            content=b"0" * (7 * 1024 * 1024),
            headers={"Content-Type": "application/zip"},
        )
        assert too_big.status_code == 413
        assert http.delete("/api/v1/functions/nobody").status_code == 404
        assert http.post("/api/v1/functions/nobody/prewarm", json={"count": 1}).status_code == 404
        assert http.post("/api/v1/functions/hello/prewarm", json={"count": 0}).status_code == 422
        assert http.post("/api/v1/nodes/nowhere/cordon").status_code == 404
        assert http.post("/api/v1/nodes/runtime-0/explode").status_code == 422
        assert http.get("/api/v1/invocations/never-was").status_code == 404
        assert http.delete("/api/v1/workflows/nobody").status_code == 404
        assert http.get("/api/v1/functions/hello").json()["name"] == "hello"  # nothing above changed it
