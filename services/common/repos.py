"""Repository identity: one repository has many spellings (HTTPS, SSH, web URL, ``owner/name``)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import PurePosixPath
from urllib.parse import urlparse

_SCP_LIKE = re.compile(r"^(?:[\w.-]+@)?([\w.-]+):(?!//)(.+)$")


def normalize_repo(url: str) -> str:
    """One spelling per repository: ``host/owner/name`` for remote URLs, the path for ``file://``.

    ``https://github.com/o/r.git``, ``git@github.com:o/r.git`` and ``ssh://git@github.com/o/r`` are
    the same repository; a bare ``o/r`` stays ``o/r`` (GitHub's full name, matched as a suffix).
    """
    url = url.strip()
    if url.startswith("file://"):
        return str(PurePosixPath(urlparse(url).path)).rstrip("/").removesuffix(".git")
    if url.startswith("/"):
        return str(PurePosixPath(url)).rstrip("/").removesuffix(".git")
    scp = _SCP_LIKE.match(url) if "://" not in url else None
    if scp:
        host, path = scp.group(1), scp.group(2)
    elif "://" in url:
        parsed = urlparse(url)
        host, path = parsed.hostname or "", parsed.path
    else:
        return url.strip("/").removesuffix(".git").lower()
    return f"{host.lower()}/{path.strip('/').removesuffix('.git')}".lower()


def _bare(name: str) -> bool:
    """``owner/name`` with no host: GitHub's full name, GitLab's path with namespace."""
    return "://" not in name and not name.startswith("/") and _SCP_LIKE.match(name) is None


def same_repo(bound: str, names: Iterable[str]) -> bool:
    """Whether a function bound to ``bound`` is bound to the pushed repository (any of ``names``).

    A bare ``owner/name`` matches a URL ending in it only when the other side says nothing more
    precise: a push that names its host never matches a binding on another host.
    """
    names = list(names)
    want = normalize_repo(bound)
    pushed_has_url = any(not _bare(n) for n in names)
    for name in names:
        got = normalize_repo(name)
        if got == want:
            return True
        if _bare(bound) and got.endswith("/" + want):
            return True
        if _bare(name) and not pushed_has_url and want.endswith("/" + got):
            return True
    return False
