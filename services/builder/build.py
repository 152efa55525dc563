"""One build: fetch the commit, install requirements into the artifact, package and store it.

Blocking work (git, pip, zip); the handler runs it in a thread. Every step writes to the build
log, which is stored next to the artifacts whatever the outcome.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from events import FunctionSpec
from services.builder.gitfetch import GitError, export_path, fetch_commit
from services.builder.settings import BuilderSettings
from services.common.artifacts import ArtifactError, ArtifactStore, package_directory

DEPS_DIR = ".deps"
"""Where requirements are installed inside an artifact; the runtime puts it on ``sys.path``."""


class BuildError(Exception):
    """A build step failed; the message is the ``build.failed`` reason."""


@dataclass(frozen=True)
class BuildResult:
    ok: bool
    commit: str | None
    digest: str | None = None
    uri: str | None = None
    size: int = 0
    reason: str = ""
    log_uri: str | None = None
    duration_ms: float = 0.0


def install_requirements(root: Path, settings: BuilderSettings, log: list[str]) -> None:
    requirements = root / "requirements.txt"
    if not requirements.is_file():
        log.append("no requirements.txt: nothing to install")
        return
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--target",
        str(root / DEPS_DIR),
        "-r",
        str(requirements),
        "--cache-dir",
        str(settings.wheel_cache),
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        *settings.pip_args,
    ]
    log.append("$ " + " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=settings.pip_timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"pip install timed out after {settings.pip_timeout_s:.0f}s") from exc
    log.append(proc.stdout.strip())
    log.append(proc.stderr.strip())
    if proc.returncode != 0:
        last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise BuildError(f"requirements did not install: {last[0][:500]}")


def run_build(
    spec: FunctionSpec, commit: str | None, settings: BuilderSettings, store: ArtifactStore, build_id: str
) -> BuildResult:
    """Build ``spec`` at ``commit`` (or its branch head when None)."""
    started = time.perf_counter()
    source = spec.source
    log = [f"build {build_id} of {spec.name}: {source.git_url} {source.git_branch} {source.git_path or '/'}"]
    sha: str | None = None
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=settings.work_dir))
    try:
        if not source.git_url:
            raise BuildError("the function is not bound to a git repository")
        sha = fetch_commit(settings.repo_cache, source.git_url, source.git_branch or "main", commit, log)
        root = tmp / "fn"
        export_path(settings.repo_cache, source.git_url, sha, source.git_path, root)
        module = spec.entrypoint.partition(":")[0].replace(".", "/")
        if not (root / f"{module}.py").is_file() and not (root / module / "__init__.py").is_file():
            raise BuildError(f"entrypoint module {module!r} is not in {source.git_path or '/'} at {sha[:12]}")
        install_requirements(root, settings, log)
        blob, digest = package_directory(root)
        uri = store.put(blob, digest)
        log.append(f"artifact {digest} ({len(blob)} bytes)")
        result = BuildResult(True, sha, digest, uri, len(blob))
    except (GitError, BuildError, ArtifactError, OSError) as exc:
        log.append(f"FAILED: {exc}")
        result = BuildResult(False, sha, reason=str(exc))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    duration_ms = (time.perf_counter() - started) * 1000
    log.append(f"took {duration_ms:.0f} ms")
    log_uri = store.put_named(f"logs/{build_id}.log", "\n".join(filter(None, log)).encode())
    return BuildResult(
        result.ok, result.commit, result.digest, result.uri, result.size, result.reason, log_uri, duration_ms
    )
