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


def same_repo(bound: str, names: Iterable[str]) -> bool:
    """Whether a function bound to ``bound`` is bound to the pushed repository (any of ``names``)."""
    want = normalize_repo(bound)
    for name in names:
        got = normalize_repo(name)
        if got == want or (("/" in got) and want.endswith("/" + got)) or (("/" in want) and got.endswith("/" + want)):
            return True
    return False
