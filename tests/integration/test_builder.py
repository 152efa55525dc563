"""The builder's build step with real git repositories and real pip installs (no broker needed)."""

from __future__ import annotations

import asyncio
import io
import zipfile
from pathlib import Path

from events import FunctionSpec
from events.function import CodeSource
from services.agent.instances import spawn_instance
from services.builder.build import run_build
from services.builder.settings import BuilderSettings
from services.common.artifacts import LocalArtifactStore, unpack_verified
from services.common.settings import CommonSettings
from tests.gitrepo import Repo, git, make_wheel

HANDLER_V = 'def main(event):\n    return {{"v": {v}}}\n'


def spec_for(
    repo: Repo, branch: str = "main", path: str = "fns/hello", entrypoint: str = "handler:main"
) -> FunctionSpec:
    return FunctionSpec(
        name="hello",
        entrypoint=entrypoint,
        source=CodeSource(kind="git", git_url=repo.url, git_branch=branch, git_path=path),
    )


def builder(tmp: Path, *pip_args: str) -> tuple[BuilderSettings, LocalArtifactStore]:
    common = CommonSettings(home=tmp / "home")
    return BuilderSettings(common=common, pip_args=list(pip_args)), LocalArtifactStore(common.artifacts_dir)


def files_of(store: LocalArtifactStore, uri: str) -> dict[str, str]:
    with zipfile.ZipFile(io.BytesIO(store.get(uri))) as zf:
        return {n: zf.read(n).decode(errors="replace") for n in zf.namelist()}


def test_builds_the_branch_head_and_exact_commits(tmp_path: Path) -> None:
    repo = Repo(tmp_path / "repo")
    first = repo.commit({"fns/hello/handler.py": HANDLER_V.format(v=1), "fns/other/x.py": "X = 1\n", "README": "r"})
    repo.push()
    second = repo.commit({"fns/hello/handler.py": HANDLER_V.format(v=2)})
    repo.push()
    settings, store = builder(tmp_path)

    head = run_build(spec_for(repo), None, settings, store, "b1")
    assert head.ok, head.reason
    assert head.commit == second
    assert files_of(store, head.uri) == {"handler.py": HANDLER_V.format(v=2)}  # only the function's folder
    assert head.digest and head.digest.startswith("sha256:")
    log = store.get(head.log_uri).decode()
    assert second in log and "no requirements.txt" in log

    old = run_build(spec_for(repo), first, settings, store, "b2")
    assert old.ok and old.commit == first
    assert files_of(store, old.uri) == {"handler.py": HANDLER_V.format(v=1)}
    assert old.digest != head.digest


def test_branches_and_force_pushes(tmp_path: Path) -> None:
    repo = Repo(tmp_path / "repo")
    repo.commit({"fns/hello/handler.py": HANDLER_V.format(v=1)})
    repo.push()
    dev = repo.commit({"fns/hello/handler.py": HANDLER_V.format(v=99)}, branch="dev")
    repo.push("dev")
    settings, store = builder(tmp_path)
    built = run_build(spec_for(repo, branch="dev"), None, settings, store, "b1")
    assert built.ok and built.commit == dev
    assert "99" in files_of(store, built.uri)["handler.py"]

    # Rewrite dev: the old commit is gone from the remote, the new head builds.
    git(repo.work, "reset", "--quiet", "--hard", "main")
    rewritten = repo.commit({"fns/hello/handler.py": HANDLER_V.format(v=7)}, branch="dev")
    repo.push("dev", force=True)
    again = run_build(spec_for(repo, branch="dev"), None, settings, store, "b2")
    assert again.ok and again.commit == rewritten != dev

    # A commit the remote never had fails with the reason, and nothing hangs.
    missing = run_build(spec_for(repo), "f" * 40, settings, store, "b3")
    assert not missing.ok and "is not in" in missing.reason
    assert "FAILED" in store.get(missing.log_uri).decode()


def test_requirements_are_installed_into_the_artifact_from_a_local_wheel_folder(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "tinydep", "0.1", "ANSWER = 42\n")
    repo = Repo(tmp_path / "repo")
    repo.commit(
        {
            "fns/hello/handler.py": "import tinydep\n\ndef main(event):\n    return {'answer': tinydep.ANSWER}\n",
            "fns/hello/requirements.txt": "tinydep==0.1\n",
        }
    )
    repo.push()
    settings, store = builder(tmp_path, "--no-index", "--find-links", str(wheels))
    built = run_build(spec_for(repo), None, settings, store, "b1")
    assert built.ok, store.get(built.log_uri).decode()
    files = files_of(store, built.uri)
    assert files[".deps/tinydep/__init__.py"] == "ANSWER = 42\n"

    # The platform's runtime imports the function with its dependency from the artifact.
    code = tmp_path / "code"
    assert built.digest is not None
    unpack_verified(store.get(built.uri), built.digest, code)

    async def run() -> dict[str, object]:
        inst = await spawn_instance(tmp_path / "node")
        try:
            loaded = await inst.request(
                {
                    "op": "load",
                    "code_dir": str(code),
                    "entrypoint": "handler:main",
                    "env": {},
                    "function": "hello",
                    "version": "v",
                },
                10,
            )
            assert loaded["ok"], loaded
            return await inst.request({"op": "invoke", "id": "i", "payload": None, "deadline_ms": None}, 10)
        finally:
            await inst.kill()

    assert asyncio.run(run())["output"] == {"answer": 42}


def test_failures_are_reported_with_the_reason(tmp_path: Path) -> None:
    settings, store = builder(tmp_path, "--no-index", "--find-links", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    repo = Repo(tmp_path / "repo")
    repo.commit({"fns/hello/handler.py": HANDLER_V.format(v=1), "fns/hello/requirements.txt": "no-such-pkg==1.0\n"})
    repo.push()

    broken = run_build(spec_for(repo), None, settings, store, "b1")
    assert not broken.ok and "requirements did not install" in broken.reason
    assert "no-such-pkg" in store.get(broken.log_uri).decode()

    unreachable = spec_for(repo).model_copy(
        update={"source": CodeSource(kind="git", git_url=(tmp_path / "nowhere.git").as_uri(), git_path="x")}
    )
    gone = run_build(unreachable, None, settings, store, "b2")
    assert not gone.ok and "git fetch" in gone.reason

    wrong_path = run_build(spec_for(repo, path="fns/nope"), None, settings, store, "b3")
    assert not wrong_path.ok and "fns/nope" in wrong_path.reason

    wrong_module = run_build(spec_for(repo, entrypoint="missing:main"), None, settings, store, "b4")
    assert not wrong_module.ok and "entrypoint module 'missing'" in wrong_module.reason
