"""Unit tests of services.builder.matching: which functions a push rebuilds."""

from __future__ import annotations

import pytest

from events import ZERO_SHA, CodeCommitted, CodeSource, FunctionSpec
from services.builder.matching import functions_to_build, touches

REPO = "https://github.com/o/r.git"
SHA = "a" * 40


def _git(
    name: str,
    *,
    url: str | None = REPO,
    branch: str | None = None,
    path: str | None = None,
) -> FunctionSpec:
    return FunctionSpec(
        name=name,
        entrypoint="handler:main",
        source=CodeSource(kind="git", git_url=url, git_branch=branch, git_path=path),
    )


def _archive(name: str) -> FunctionSpec:
    return FunctionSpec(
        name=name, entrypoint="handler:main", source=CodeSource(kind="archive", digest="sha256:" + "0" * 64)
    )


def _push(
    *,
    repo: str = REPO,
    aliases: list[str] | None = None,
    ref: str = "refs/heads/main",
    after: str | None = SHA,
    changed: list[str] | None = None,
    only: list[str] | None = None,
) -> CodeCommitted:
    return CodeCommitted(
        repo=repo,
        repo_aliases=aliases or [],
        ref=ref,
        before="b" * 40,
        after=after,
        changed_paths=changed,
        delivery_id="test:1",
        only_functions=only,
    )


def _names(specs: list[FunctionSpec]) -> list[str]:
    return [s.name for s in specs]


# --- touches ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [None, "", "/", ".", "./", "//"])
def test_a_function_at_the_repo_root_is_touched_by_any_change(path: str | None) -> None:
    assert touches(path, ["anything/at/all.txt"])
    assert touches(path, ["README.md"])


def test_unknown_changes_touch_everything() -> None:
    assert touches("fns/hello", None)


@pytest.mark.parametrize(
    ("changed", "hit"),
    [
        (["fns/hello/handler.py"], True),
        (["fns/hello/lib/deep/x.py"], True),
        (["fns/hello"], True),  # the folder itself (e.g. a submodule or a file of that name)
        (["fns/hello2/x.py"], False),
        (["fns/hello.py"], False),
        (["fns/hello-world/handler.py"], False),
        (["fns/other/handler.py"], False),
        (["fns/handler.py"], False),
        (["README.md"], False),
        (["other/fns/hello/handler.py"], False),
        ([], False),
        (["README.md", "fns/hello/handler.py"], True),
    ],
)
def test_path_prefix_is_a_path_component_prefix(changed: list[str], hit: bool) -> None:
    assert touches("fns/hello", changed) is hit


@pytest.mark.parametrize("path", ["/fns/hello", "fns/hello/", "/fns/hello/"])
def test_leading_and_trailing_slashes_of_git_path_are_ignored(path: str) -> None:
    assert touches(path, ["fns/hello/handler.py"])
    assert not touches(path, ["fns/hello2/handler.py"])


# --- functions_to_build ----------------------------------------------------------------------------


def test_only_git_functions_on_the_same_repo_are_built() -> None:
    specs = [
        _git("bound"),
        _git("bound-ssh", url="git@github.com:o/r.git"),
        _git("other-repo", url="https://github.com/o/other.git"),
        _git("no-url", url=None),
        _archive("archive"),
    ]
    assert _names(functions_to_build(_push(), specs)) == ["bound", "bound-ssh"]


def test_a_repo_alias_matches_the_binding() -> None:
    spec = _git("a", url="Codertocat/Hello-World")
    push = _push(
        repo="https://github.com/Codertocat/Hello-World.git", aliases=["git@github.com:Codertocat/Hello-World.git"]
    )
    assert _names(functions_to_build(push, [spec])) == ["a"]
    push = _push(repo="https://example.com/x.git", aliases=["https://github.com/Codertocat/Hello-World"])
    assert _names(functions_to_build(push, [_git("b", url="git@github.com:Codertocat/Hello-World.git")])) == ["b"]


def test_branch_must_match_and_defaults_to_main() -> None:
    specs = [
        _git("default"),  # git_branch None means "main"
        _git("main", branch="main"),
        _git("dev", branch="dev"),
        _git("master", branch="master"),
    ]
    assert _names(functions_to_build(_push(ref="refs/heads/main"), specs)) == ["default", "main"]
    assert _names(functions_to_build(_push(ref="refs/heads/dev"), specs)) == ["dev"]
    assert _names(functions_to_build(_push(ref="refs/heads/master"), specs)) == ["master"]
    assert functions_to_build(_push(ref="refs/heads/feature/x"), specs) == []


def test_branch_names_with_slashes() -> None:
    spec = _git("f", branch="feature/x")
    assert _names(functions_to_build(_push(ref="refs/heads/feature/x"), [spec])) == ["f"]


def test_changed_path_must_be_under_git_path() -> None:
    specs = [_git("hello", path="fns/hello"), _git("hello2", path="fns/hello2"), _git("root")]
    push = _push(changed=["fns/hello2/x.py"])
    assert _names(functions_to_build(push, specs)) == ["hello2", "root"]
    push = _push(changed=["fns/hello/handler.py"])
    assert _names(functions_to_build(push, specs)) == ["hello", "root"]
    push = _push(changed=["docs/index.md"])
    assert _names(functions_to_build(push, specs)) == ["root"]


def test_unknown_changed_paths_rebuild_every_bound_function() -> None:
    specs = [_git("hello", path="fns/hello"), _git("hello2", path="fns/hello2"), _git("root")]
    assert _names(functions_to_build(_push(changed=None), specs)) == ["hello", "hello2", "root"]


def test_a_deleted_branch_builds_nothing() -> None:
    specs = [_git("a"), _git("b", path="fns/b")]
    assert functions_to_build(_push(after=ZERO_SHA, changed=None), specs) == []
    assert functions_to_build(_push(after="0" * 40, changed=["fns/b/x.py"]), specs) == []


@pytest.mark.parametrize("ref", ["refs/tags/v1.0", "refs/tags/main", "refs/pull/1/head", "main", "refs/heads"])
def test_tags_and_non_branch_refs_build_nothing(ref: str) -> None:
    assert functions_to_build(_push(ref=ref), [_git("a"), _git("main", branch="main")]) == []


def test_only_functions_restricts_the_builds() -> None:
    specs = [_git("a"), _git("b"), _git("c"), _git("elsewhere", url="https://github.com/o/x.git")]
    assert _names(functions_to_build(_push(only=["b", "elsewhere"]), specs)) == ["b"]
    assert functions_to_build(_push(only=[]), specs) == []
    assert _names(functions_to_build(_push(only=None), specs)) == ["a", "b", "c"]


def test_result_is_sorted_by_name() -> None:
    specs = [_git("zeta"), _git("alpha"), _git("mid"), _git("beta")]
    assert _names(functions_to_build(_push(), specs)) == ["alpha", "beta", "mid", "zeta"]


def test_specs_may_be_any_iterable() -> None:
    specs = {"b": _git("b"), "a": _git("a")}
    assert _names(functions_to_build(_push(), specs.values())) == ["a", "b"]
    assert _names(functions_to_build(_push(), (s for s in specs.values()))) == ["a", "b"]


def test_a_github_push_does_not_rebuild_a_function_bound_to_another_host() -> None:
    # The shape webhooks.parse gives a GitHub push: clone URL, then ssh/html/git URLs and the bare full name.
    push = _push(
        repo="https://github.com/o/r.git",
        aliases=["git@github.com:o/r.git", "https://github.com/o/r", "git://github.com/o/r.git", "o/r"],
    )
    specs = [_git("on-github", url="git@github.com:o/r.git"), _git("on-gitlab", url="https://gitlab.com/o/r.git")]
    # BUG (services/common/repos.py same_repo): the bare alias "o/r" is suffix-matched against the
    # GitLab binding, so the builder would clone gitlab.com/o/r at a GitHub commit and fail the build.
    assert _names(functions_to_build(push, specs)) == ["on-github"]
