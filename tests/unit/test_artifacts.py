"""Unit tests of services.common.artifacts: packaging, verification, the local store."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest

from services.common.artifacts import (
    ArtifactError,
    LocalArtifactStore,
    digest_of,
    package_directory,
    unpack_verified,
)


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


FILES = {
    "handler.py": b"def main(event, ctx):\n    return event\n",
    "lib/util.py": b"X = 1\n",
    "lib/data/table.json": b'{"a": 1}',
}


def _zip(entries: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def test_package_directory_digest_matches_contents(tmp_path: Path) -> None:
    root = _tree(tmp_path / "code", FILES)
    blob, digest = package_directory(root)
    assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 64
    assert digest == digest_of(list(FILES.items()))
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        assert sorted(zf.namelist()) == sorted(FILES)
        assert zf.read("lib/util.py") == b"X = 1\n"


def test_package_directory_is_deterministic_across_mtimes(tmp_path: Path) -> None:
    a = _tree(tmp_path / "a", FILES)
    b = _tree(tmp_path / "b", dict(reversed(list(FILES.items()))))  # created in another order
    for path in a.rglob("*"):
        os.utime(path, (1_000_000, 1_000_000))
    for path in b.rglob("*"):
        os.utime(path, (1_700_000_000, 1_700_000_000))
    blob_a, digest_a = package_directory(a)
    blob_b, digest_b = package_directory(b)
    assert digest_a == digest_b
    assert blob_a == blob_b  # even the zip bytes are identical
    # And again after touching a file without changing it.
    os.utime(a / "handler.py", (2_000_000_000, 2_000_000_000))
    assert package_directory(a) == (blob_a, digest_a)


def test_package_directory_skips_caches_and_bytecode(tmp_path: Path) -> None:
    clean = _tree(tmp_path / "clean", FILES)
    dirty = _tree(
        tmp_path / "dirty",
        {
            **FILES,
            "__pycache__/handler.cpython-311.pyc": b"\x00bytecode",
            "lib/__pycache__/util.cpython-311.pyc": b"\x00bytecode",
            "lib/stale.pyc": b"\x00",
            "lib/stale.pyo": b"\x00",
            ".git/HEAD": b"ref: refs/heads/main\n",
            ".venv/lib/site.py": b"",
            "node_modules/x/index.js": b"",
        },
    )
    blob_clean, digest_clean = package_directory(clean)
    blob_dirty, digest_dirty = package_directory(dirty)
    assert digest_dirty == digest_clean
    assert blob_dirty == blob_clean
    with zipfile.ZipFile(io.BytesIO(blob_dirty)) as zf:
        names = zf.namelist()
    assert not any("__pycache__" in n or n.endswith((".pyc", ".pyo")) or n.startswith(".git/") for n in names)


@pytest.mark.parametrize("change", ["content", "new_file", "rename"])
def test_digest_changes_with_the_code(tmp_path: Path, change: str) -> None:
    root = _tree(tmp_path / "code", FILES)
    _, before = package_directory(root)
    if change == "content":
        (root / "lib/util.py").write_bytes(b"X = 2\n")
    elif change == "new_file":
        (root / "extra.txt").write_bytes(b"")
    else:
        (root / "lib/util.py").rename(root / "lib/util2.py")
    _, after = package_directory(root)
    assert after != before


def test_digest_is_not_fooled_by_moving_bytes_between_path_and_content() -> None:
    assert digest_of([("ab", b"c")]) != digest_of([("a", b"bc")])
    assert digest_of([("a", b""), ("b", b"")]) != digest_of([("a", b"\0b")])


def test_package_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not a directory"):
        package_directory(tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="not a directory"):
        package_directory(tmp_path / "file")
    _tree(tmp_path / "only-cache", {"__pycache__/x.pyc": b"x"})
    with pytest.raises(ArtifactError, match="no files"):
        package_directory(tmp_path / "only-cache")


def test_unpack_verified_round_trip(tmp_path: Path) -> None:
    blob, digest = package_directory(_tree(tmp_path / "code", FILES))
    dest = tmp_path / "cache" / digest.replace(":", "-")
    unpack_verified(blob, digest, dest)
    for rel, data in FILES.items():
        assert (dest / rel).read_bytes() == data
    # No temporary folders are left next to it.
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]
    # Unpacking the same digest again (e.g. a concurrent fetch) is harmless.
    unpack_verified(blob, digest, dest)
    assert (dest / "handler.py").read_bytes() == FILES["handler.py"]
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


def test_unpack_verified_rejects_tampered_zip(tmp_path: Path) -> None:
    _, digest = package_directory(_tree(tmp_path / "code", FILES))
    tampered = _zip(
        [(rel, data) for rel, data in FILES.items() if rel != "handler.py"]
        + [("handler.py", b"import os; os.system('evil')\n")]
    )
    dest = tmp_path / "cache" / "x"
    with pytest.raises(ArtifactError, match="digest mismatch"):
        unpack_verified(tampered, digest, dest)
    assert not dest.exists()


def test_unpack_verified_rejects_extra_file(tmp_path: Path) -> None:
    _, digest = package_directory(_tree(tmp_path / "code", FILES))
    extra = _zip([*FILES.items(), ("sitecustomize.py", b"")])
    with pytest.raises(ArtifactError, match="digest mismatch"):
        unpack_verified(extra, digest, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("name", ["../evil.py", "lib/../../evil.py", "/etc/evil.py"])
def test_unpack_verified_rejects_escaping_entries(tmp_path: Path, name: str) -> None:
    entries = [("handler.py", b"x"), (name, b"pwned")]
    blob = _zip(entries)
    # The digest matches the entries, so only the path check can refuse it.
    digest = digest_of(entries)
    dest = tmp_path / "deep" / "cache" / "dest"
    with pytest.raises(ArtifactError, match="escapes"):
        unpack_verified(blob, digest, dest)
    assert not dest.exists()
    assert not (tmp_path / "deep" / "cache" / "evil.py").exists()
    assert not (tmp_path / "deep" / "evil.py").exists()


def test_unpack_verified_rejects_non_zip(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not a zip"):
        unpack_verified(b"definitely not a zip", "sha256:00", tmp_path / "dest")


def test_local_store_round_trip(tmp_path: Path) -> None:
    blob, digest = package_directory(_tree(tmp_path / "code", FILES))
    store = LocalArtifactStore(tmp_path / "artifacts")
    uri = store.put(blob, digest)
    assert uri.startswith("file://")
    assert uri.endswith(digest.replace(":", "-") + ".zip")
    assert store.get(uri) == blob
    # Putting it again is idempotent and returns the same URI.
    assert store.put(blob, digest) == uri
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == [digest.replace(":", "-") + ".zip"]


def test_local_store_round_trip_in_a_folder_with_a_space(tmp_path: Path) -> None:
    """``put`` returns ``Path.as_uri()``, which percent-encodes; ``get`` must decode it.

    Exposes a bug: ``LocalArtifactStore.get`` reads ``urlparse(uri).path`` as is, so a store
    under e.g. ``~/Library/Application Support`` cannot read back what it just stored.
    """
    store = LocalArtifactStore(tmp_path / "my artifacts")
    uri = store.put(b"zip bytes", "sha256:" + "0" * 64)
    assert store.get(uri) == b"zip bytes"


@pytest.mark.parametrize("uri", ["https://example.com/sha256-00.zip", "s3://bucket/sha256-00.zip", "/plain/path.zip"])
def test_local_store_refuses_non_file_uris(tmp_path: Path, uri: str) -> None:
    with pytest.raises(ArtifactError, match="cannot fetch"):
        LocalArtifactStore(tmp_path).get(uri)


def test_local_store_missing_file(tmp_path: Path) -> None:
    uri = (tmp_path / "nope.zip").as_uri()
    with pytest.raises(ArtifactError, match="cannot read"):
        LocalArtifactStore(tmp_path).get(uri)
