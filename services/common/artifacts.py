"""Content-addressed code artifacts: packaging, the artifact store, and verification.

An artifact is a zip of a function's files. Its digest is the SHA-256 of the sorted
(path, content) pairs, so the same files give the same digest whatever their timestamps,
and an agent can verify what it fetched before any instance imports it.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

SKIP_DIRS = frozenset({"__pycache__", ".git", ".venv", "venv", "node_modules", ".mypy_cache", ".pytest_cache"})
MAX_ARTIFACT_BYTES = 256 * 1024 * 1024


class ArtifactError(Exception):
    """An artifact could not be built, stored, fetched or verified."""


def _files(root: Path) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith((".pyc", ".pyo")):
                continue
            path = Path(dirpath) / name
            if path.is_file():
                found.append((path.relative_to(root).as_posix(), path))
    return found


def digest_of(entries: list[tuple[str, bytes]]) -> str:
    """``sha256:<hex>`` over sorted (path, content) pairs."""
    h = hashlib.sha256()
    for rel, data in sorted(entries):
        h.update(rel.encode())
        h.update(b"\0")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return "sha256:" + h.hexdigest()


def package_directory(root: Path) -> tuple[bytes, str]:
    """Zip a directory deterministically; returns (zip bytes, digest)."""
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a directory")
    entries = [(rel, path.read_bytes()) for rel, path in _files(root)]
    if not entries:
        raise ArtifactError(f"{root} holds no files")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel, data in sorted(entries):
            info = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    blob = buf.getvalue()
    if len(blob) > MAX_ARTIFACT_BYTES:
        raise ArtifactError(f"{root} packs to {len(blob)} bytes, over the {MAX_ARTIFACT_BYTES} limit")
    return blob, digest_of(entries)


def entries_of(blob: bytes) -> list[tuple[str, bytes]]:
    """The (path, content) pairs of a zip artifact; :class:`ArtifactError` if it is not one or escapes its folder."""
    if len(blob) > MAX_ARTIFACT_BYTES:
        raise ArtifactError(f"artifact of {len(blob)} bytes is over the {MAX_ARTIFACT_BYTES} limit")
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            entries = []
            for info in zf.infolist():
                if info.is_dir():
                    continue
                rel = info.filename
                if rel.startswith("/") or ".." in Path(rel).parts:
                    raise ArtifactError(f"artifact entry {rel!r} escapes its folder")
                entries.append((rel, zf.read(info)))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError) as exc:
        raise ArtifactError(f"artifact is not a zip: {exc}") from exc
    return entries


def digest_of_archive(blob: bytes) -> str:
    """The digest of an uploaded zip's files (as :func:`package_directory` gives for the same files)."""
    entries = entries_of(blob)
    if not entries:
        raise ArtifactError("the archive holds no files")
    return digest_of(entries)


def unpack_verified(blob: bytes, digest: str, dest: Path) -> None:
    """Unpack an artifact into ``dest`` (atomically) after checking its digest."""
    entries = entries_of(blob)
    actual = digest_of(entries)
    if actual != digest:
        raise ArtifactError(f"digest mismatch: expected {digest}, got {actual}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    for rel, data in entries:
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    try:
        tmp.rename(dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # a concurrent unpack of the same digest won
        if not dest.is_dir():
            raise


class ArtifactStore(Protocol):
    """Where artifacts live between the one who builds them and the agents that run them."""

    def put(self, blob: bytes, digest: str) -> str:
        """Store an artifact; returns its URI."""
        ...

    def get(self, uri: str) -> bytes:
        """Fetch an artifact's bytes by URI."""
        ...

    def put_named(self, name: str, blob: bytes) -> str:
        """Store a named object that is not an artifact (a build log); returns its URI."""
        ...


class LocalArtifactStore:
    """A directory of ``sha256-<hex>.zip`` files (the embedded shape; object stores come later)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, blob: bytes, digest: str) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / (digest.replace(":", "-") + ".zip")
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(blob)
            tmp.rename(path)
        return path.resolve().as_uri()

    def put_named(self, name: str, blob: bytes) -> str:
        path = (self.root / name).resolve()
        if self.root.resolve() not in path.parents:
            raise ArtifactError(f"name {name!r} escapes the store")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(blob)
        tmp.rename(path)
        return path.as_uri()

    def get(self, uri: str) -> bytes:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise ArtifactError(f"the local artifact store cannot fetch {uri!r}")
        try:
            return Path(unquote(parsed.path)).read_bytes()
        except OSError as exc:
            raise ArtifactError(f"cannot read artifact {uri}: {exc}") from exc
