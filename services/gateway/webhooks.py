"""Pure parsing and verification of git host webhooks: GitHub, GitLab and Stoker's generic form.

Every accepted push becomes one ``code.committed`` event. Signatures are HMAC-SHA256 over the raw
body compared in constant time (GitHub's ``X-Hub-Signature-256`` scheme, also used by the generic
form as ``X-Stoker-Signature-256``); GitLab sends its shared token in ``X-Gitlab-Token``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from events import CodeCommitted

Host = Literal["github", "gitlab", "generic"]


class WebhookRejected(Exception):
    """The delivery is refused; ``status`` is the HTTP answer, ``reason`` a short label for metrics."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass(frozen=True)
class Delivery:
    """One parsed webhook delivery."""

    host: Host
    delivery_id: str
    kind: Literal["push", "ping", "ignored"]
    repo_names: list[str]
    push: CodeCommitted | None = None


def sign(secret: str, body: bytes) -> str:
    """``sha256=<hex>`` of the body: what a sender puts in the signature header."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature_valid(secret: str, body: bytes, header: str | None) -> bool:
    if not header or not header.startswith("sha256=") or not header.isascii():
        return False
    return hmac.compare_digest(sign(secret, body).encode(), header.strip().encode())


def host_of(headers: Mapping[str, str]) -> Host:
    if "x-github-event" in headers:
        return "github"
    if "x-gitlab-event" in headers:
        return "gitlab"
    return "generic"


def _changed(commits: Any) -> list[str] | None:
    if not isinstance(commits, list) or not commits:
        return None
    paths: set[str] = set()
    for commit in commits:
        if not isinstance(commit, dict):
            return None
        for key in ("added", "modified", "removed"):
            files = commit.get(key)
            if not isinstance(files, list):
                return None  # the host did not list files: rebuild everything bound
            paths.update(str(f) for f in files)
    return sorted(paths)


def _require(obj: Mapping[str, Any], *keys: str) -> None:
    missing = [k for k in keys if not isinstance(obj.get(k), str) or not obj.get(k)]
    if missing:
        raise WebhookRejected(400, "malformed", f"the payload lacks {', '.join(missing)}")


def parse(host: Host, headers: Mapping[str, str], body: Any, body_digest: str) -> Delivery:
    """Turn a verified-later delivery into a ``Delivery``; raises WebhookRejected for bad input."""
    if not isinstance(body, dict):
        raise WebhookRejected(400, "malformed", "the payload is not a JSON object")
    if host == "github":
        event = headers.get("x-github-event", "")
        delivery = headers.get("x-github-delivery") or ""
        if not delivery:
            raise WebhookRejected(400, "malformed", "X-GitHub-Delivery is missing")
        repo: dict[str, Any] = body["repository"] if isinstance(body.get("repository"), dict) else {}
        names = [str(repo[k]) for k in ("clone_url", "ssh_url", "html_url", "git_url", "full_name") if repo.get(k)]
        if event == "ping":
            return Delivery("github", delivery, "ping", names)
        if event != "push":
            raise WebhookRejected(400, "unsupported_event", f"GitHub event {event!r} is not handled (push, ping)")
        _require(body, "ref")
        # A force push drops commits the list does not show: what changed is then unknown.
        changed = None if body.get("forced") else _changed(body.get("commits"))
        push = CodeCommitted(
            repo=names[0] if names else "",
            repo_aliases=names[1:],
            ref=body["ref"],
            before=body.get("before"),
            after=body.get("after"),
            changed_paths=changed,
            delivery_id=f"github:{delivery}",
            source="github",
        )
        return Delivery("github", delivery, "push", names, push)
    if host == "gitlab":
        event = headers.get("x-gitlab-event", "")
        delivery = headers.get("idempotency-key") or headers.get("x-gitlab-event-uuid") or body_digest
        project: dict[str, Any] = body["project"] if isinstance(body.get("project"), dict) else {}
        repository: dict[str, Any] = body["repository"] if isinstance(body.get("repository"), dict) else {}
        names = [
            str(v)
            for v in (
                project.get("git_http_url"),
                project.get("git_ssh_url"),
                project.get("web_url"),
                project.get("path_with_namespace"),
                repository.get("git_http_url"),
            )
            if v
        ]
        if event == "Tag Push Hook":
            # Answered 2xx: GitLab disables hooks that keep failing, and tags build nothing.
            return Delivery("gitlab", delivery, "ignored", names)
        if event not in ("Push Hook", "System Hook") or body.get("object_kind", "push") != "push":
            raise WebhookRejected(400, "unsupported_event", f"GitLab event {event!r} is not handled (Push Hook)")
        _require(body, "ref")
        commits = body.get("commits")
        total = body.get("total_commits_count")
        # GitLab lists at most 20 commits: with more, what changed is unknown.
        truncated = isinstance(total, int) and isinstance(commits, list) and total > len(commits)
        changed = None if truncated else _changed(commits)
        push = CodeCommitted(
            repo=names[0] if names else "",
            repo_aliases=names[1:],
            ref=body["ref"],
            before=body.get("before"),
            after=body.get("after") or body.get("checkout_sha"),
            changed_paths=changed,
            delivery_id=f"gitlab:{delivery}",
            source="gitlab",
        )
        return Delivery("gitlab", delivery, "push", names, push)
    delivery = headers.get("x-stoker-delivery") or body_digest
    _require(body, "repo", "ref")
    paths = body.get("paths")
    ref = body["ref"] if body["ref"].startswith("refs/") else f"refs/heads/{body['ref']}"
    push = CodeCommitted(
        repo=body["repo"],
        ref=ref,
        before=body.get("before"),
        after=body.get("after"),
        changed_paths=[str(p) for p in paths] if isinstance(paths, list) else None,
        delivery_id=f"generic:{delivery}",
        source="generic",
    )
    return Delivery("generic", delivery, "push", [body["repo"]], push)


def authenticate(
    delivery: Delivery, headers: Mapping[str, str], raw: bytes, secret_for: Callable[[list[str]], str | None]
) -> None:
    """Check the delivery's signature or token against the repository's secret (or the global one)."""
    secret = secret_for(delivery.repo_names)
    if not secret:
        raise WebhookRejected(401, "no_secret", "no webhook secret is configured for this repository")
    if delivery.host == "gitlab":
        token = headers.get("x-gitlab-token") or ""
        if not hmac.compare_digest(token.encode(), secret.encode()):
            raise WebhookRejected(401, "bad_token", "X-Gitlab-Token does not match")
        return
    header = headers.get("x-hub-signature-256" if delivery.host == "github" else "x-stoker-signature-256")
    if not signature_valid(secret, raw, header):
        raise WebhookRejected(401, "bad_signature", "the signature does not match the body")
