"""Fetching exactly one commit of one path with real git, through a bare mirror per repository."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

GIT_TIMEOUT_S = 120.0


class GitError(Exception):
    """A fetch failed; the message is meant for the build log and the ``build.failed`` reason."""


def _git(args: list[str], cwd: Path | None = None, timeout_s: float = GIT_TIMEOUT_S) -> bytes:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true", "LC_ALL": "C"}
    # Never prompt for credentials or host keys: an unreachable repo must fail, not hang.
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes -o ConnectTimeout=15")
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise GitError(f"git {' '.join(args[:2])} timed out after {timeout_s:.0f}s") from exc
    if proc.returncode != 0:
        raise GitError(f"git {' '.join(args)} failed: {proc.stderr.decode(errors='replace').strip()[-2000:]}")
    return proc.stdout


def mirror_path(cache: Path, url: str) -> Path:
    return cache / (hashlib.sha256(url.encode()).hexdigest()[:24] + ".git")


def fetch_commit(cache: Path, url: str, branch: str, commit: str | None, log: list[str]) -> str:
    """Bring ``commit`` (or the head of ``branch``) into the mirror; returns the full commit sha."""
    mirror = mirror_path(cache, url)
    if not mirror.exists():
        mirror.parent.mkdir(parents=True, exist_ok=True)
        _git(["init", "--quiet", "--bare", str(mirror)])
    log.append(f"$ git fetch {url} {branch}")
    try:
        _git(["fetch", "--quiet", "--no-tags", "--force", url, f"+refs/heads/{branch}:refs/heads/{branch}"], mirror)
    except GitError:
        if commit is None:
            raise
        log.append("  branch fetch failed; trying the commit itself")
    wanted = commit or f"refs/heads/{branch}"
    try:
        sha = _git(["rev-parse", "--verify", "--quiet", f"{wanted}^{{commit}}"], mirror).decode().strip()
    except GitError:
        if commit is None:
            raise GitError(f"branch {branch!r} has no commits in {url}") from None
        # A commit no longer on the branch (force-pushed away) may still be fetchable by id.
        log.append(f"$ git fetch {url} {commit}")
        try:
            _git(["fetch", "--quiet", "--no-tags", url, commit], mirror)
            sha = _git(["rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"], mirror).decode().strip()
        except GitError as exc:
            raise GitError(f"commit {commit} is not in {url}: {exc}") from exc
    log.append(f"  commit {sha}")
    return sha


def export_path(cache: Path, url: str, sha: str, path: str | None, dest: Path) -> None:
    """Write the files under ``path`` at ``sha`` into ``dest`` (``dest`` becomes the function's root)."""
    mirror = mirror_path(cache, url)
    sub = (path or "").strip("/")
    args = ["archive", "--format=tar", sha]
    if sub:
        args += ["--", sub]
    try:
        blob = _git(args, mirror)
    except GitError as exc:
        raise GitError(f"path {sub!r} is not in commit {sha[:12]}") from exc
    dest.mkdir(parents=True, exist_ok=True)
    prefix = f"{sub}/" if sub else ""
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        members = []
        for member in tar.getmembers():
            if not member.name.startswith(prefix) or not (member.isfile() or member.isdir()):
                continue  # symlinks and devices are not part of a function
            member.name = member.name[len(prefix) :]
            if member.name:
                members.append(member)
        tar.extractall(dest, members=members, filter="data")
    if not any(dest.iterdir()):
        raise GitError(f"path {sub!r} is empty in commit {sha[:12]}")
