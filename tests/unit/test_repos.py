"""Unit tests of services.common.repos: one repository, many spellings."""

from __future__ import annotations

import pytest

from services.common.repos import normalize_repo, same_repo

GITHUB_SPELLINGS = [
    "https://github.com/Codertocat/Hello-World.git",
    "https://github.com/Codertocat/Hello-World",
    "https://github.com/Codertocat/Hello-World/",
    "http://github.com/Codertocat/Hello-World.git",
    "https://user:token@github.com/Codertocat/Hello-World.git",
    "git@github.com:Codertocat/Hello-World.git",
    "git@github.com:Codertocat/Hello-World",
    "github.com:Codertocat/Hello-World.git",
    "ssh://git@github.com/Codertocat/Hello-World.git",
    "ssh://git@github.com:22/Codertocat/Hello-World",
    "git://github.com/Codertocat/Hello-World.git",
    "  https://github.com/Codertocat/Hello-World.git\n",
]


@pytest.mark.parametrize("url", GITHUB_SPELLINGS)
def test_every_spelling_of_a_github_repo_normalizes_alike(url: str) -> None:
    assert normalize_repo(url) == "github.com/codertocat/hello-world"


@pytest.mark.parametrize("bound", GITHUB_SPELLINGS)
@pytest.mark.parametrize("pushed", GITHUB_SPELLINGS)
def test_every_pair_of_spellings_is_the_same_repo(bound: str, pushed: str) -> None:
    assert same_repo(bound, [pushed])


@pytest.mark.parametrize(
    "url",
    [
        "https://GitHub.COM/Codertocat/Hello-World.git",
        "git@GITHUB.com:Codertocat/Hello-World.git",
        "SSH://git@GitHub.com/Codertocat/Hello-World",
    ],
)
def test_hosts_are_case_insensitive(url: str) -> None:
    assert normalize_repo(url) == "github.com/codertocat/hello-world"
    assert same_repo(url, ["https://github.com/codertocat/hello-world.git"])


@pytest.mark.parametrize(
    "a", ["file:///tmp/x", "/tmp/x", "file:///tmp/x.git", "/tmp/x.git", "file:///tmp/x/", "/tmp/x/"]
)
@pytest.mark.parametrize("b", ["file:///tmp/x", "/tmp/x", "file:///tmp/x.git"])
def test_local_paths_and_file_urls_are_the_same_repo(a: str, b: str) -> None:
    assert normalize_repo(a) == "/tmp/x"
    assert same_repo(a, [b])


def test_local_paths_of_different_folders_differ() -> None:
    assert not same_repo("file:///tmp/x", ["/tmp/y"])
    assert not same_repo("/tmp/x", ["file:///tmp/xy"])
    assert not same_repo("/tmp/x", ["file:///other/tmp/x"])


def test_full_name_binding_matches_the_repos_urls() -> None:
    assert normalize_repo("Codertocat/Hello-World") == "codertocat/hello-world"
    assert normalize_repo("Codertocat/Hello-World.git") == "codertocat/hello-world"
    for url in GITHUB_SPELLINGS:
        assert same_repo("Codertocat/Hello-World", [url])
        assert same_repo(url, ["Codertocat/Hello-World"])


@pytest.mark.parametrize(
    ("bound", "pushed"),
    [
        ("https://github.com/Codertocat/Hello-World.git", "https://github.com/Codertocat/Hello-World2.git"),
        ("https://github.com/Codertocat/Hello-World.git", "https://github.com/Octocoders/Hello-World.git"),
        ("https://github.com/o/r.git", "git@github.com:o/other.git"),
        ("git@github.com:o/r.git", "ssh://git@github.com/o/r-2"),
        ("Codertocat/Hello-World", "https://github.com/Octocoders/Hello-World.git"),
        ("Codertocat/Hello-World", "World"),
        ("https://github.com/o/r", "https://github.com/o/r/extra"),
        ("https://github.com/o/r", "/tmp/r"),
    ],
)
def test_different_repos_are_not_the_same(bound: str, pushed: str) -> None:
    assert not same_repo(bound, [pushed])


def test_suffix_match_is_on_path_components() -> None:
    # "lo-world" is a suffix of "hello-world" as a string but not as a path component.
    assert not same_repo("https://github.com/codertocat/hello-world", ["tocat/hello-world"])


def test_any_of_several_names_matches() -> None:
    names = ["https://github.com/o/other.git", "git@github.com:o/r.git"]
    assert same_repo("https://github.com/o/r", names)
    assert not same_repo("https://github.com/o/r", [])


def test_the_same_owner_and_name_on_another_host_is_another_repo() -> None:
    # A GitHub push names the repo by its URLs *and* its bare full name (see webhooks.parse).
    github_push = [
        "https://github.com/o/r.git",
        "git@github.com:o/r.git",
        "https://github.com/o/r",
        "git://github.com/o/r.git",
        "o/r",
    ]
    assert not same_repo("https://github.com/o/r", ["https://gitlab.com/o/r.git"])  # host-qualified names: fine
    # BUG: the bare alias "o/r" is suffix-matched against any host, so this GitHub push "is" the
    # GitLab (or local) repository too, and the builder rebuilds functions bound to those.
    assert not same_repo("https://gitlab.com/o/r", github_push)
    assert not same_repo("file:///srv/git/o/r", github_push)
