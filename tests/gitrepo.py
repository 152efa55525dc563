"""Real git repositories and real wheels for tests, made in temporary folders."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import zipfile
from pathlib import Path

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "PATH": "/usr/bin:/bin:/usr/local/bin",
}


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True, text=True)
    if out.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {out.stderr}")
    return out.stdout.strip()


class Repo:
    """A bare 'remote' repository plus a working clone that commits and pushes to it."""

    def __init__(self, root: Path) -> None:
        self.remote = root / "remote.git"
        self.work = root / "work"
        root.mkdir(parents=True, exist_ok=True)
        git(root, "init", "--quiet", "--bare", "-b", "main", str(self.remote))
        git(root, "init", "--quiet", "-b", "main", str(self.work))
        git(self.work, "remote", "add", "origin", str(self.remote))

    @property
    def url(self) -> str:
        return self.remote.as_uri()

    def write(self, files: dict[str, str]) -> None:
        for rel, text in files.items():
            path = self.work / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    def commit(self, files: dict[str, str], message: str = "change", branch: str = "main") -> str:
        current = git(self.work, "symbolic-ref", "--short", "HEAD")
        if current != branch:
            exists = (
                subprocess.run(
                    ["git", "rev-parse", "--verify", "--quiet", branch], cwd=self.work, env=GIT_ENV, capture_output=True
                ).returncode
                == 0
            )
            git(self.work, "checkout", "--quiet", *([] if exists else ["-b"]), branch)
        self.write(files)
        git(self.work, "add", "-A")
        git(self.work, "commit", "--quiet", "-m", message)
        return git(self.work, "rev-parse", "HEAD")

    def push(self, branch: str = "main", force: bool = False) -> None:
        git(self.work, "push", "--quiet", *(["--force"] if force else []), "origin", branch)


def make_wheel(folder: Path, name: str, version: str, module_source: str) -> Path:
    """A minimal pure-Python wheel, built by hand (no build backend, no network)."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": module_source.encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: stoker-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for rel, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{rel},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for rel, data in files.items():
            zf.writestr(rel, data)
    return path
