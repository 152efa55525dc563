"""Pure matching of pushes to functions: which functions does a push rebuild?"""

from __future__ import annotations

from collections.abc import Iterable

from events import CodeCommitted, FunctionSpec
from services.common.repos import same_repo


def touches(path: str | None, changed: list[str] | None) -> bool:
    """Whether a push that changed ``changed`` files touches the function at ``path``."""
    if changed is None or not path or path.strip("/") in ("", "."):
        return True
    prefix = path.strip("/")
    return any(p == prefix or p.startswith(prefix + "/") for p in changed)


def functions_to_build(event: CodeCommitted, specs: Iterable[FunctionSpec]) -> list[FunctionSpec]:
    """The git-bound functions this push rebuilds: same repo, same branch, and a changed path."""
    if event.deleted or event.branch is None:
        return []  # a deleted branch or a tag builds nothing
    names = [event.repo, *event.repo_aliases]
    return sorted(
        (
            spec
            for spec in specs
            if spec.source.kind == "git"
            and spec.source.git_url
            and (spec.source.git_branch or "main") == event.branch
            and same_repo(spec.source.git_url, names)
            and touches(spec.source.git_path, event.changed_paths)
            and (event.only_functions is None or spec.name in event.only_functions)
        ),
        key=lambda s: s.name,
    )
