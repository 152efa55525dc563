"""The function family: the desired spec of a function, kept on the compacted ``function`` topic."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from events.base import Record, now_ms
from events.placement import ROLE, RUNTIME_TOLERATION, Toleration

FUNCTION_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
"""Function names are DNS labels, so they can become Kubernetes names and topic keys as they are."""

ENTRYPOINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class CodeSource(BaseModel):
    """Where a function's code comes from.

    ``archive``: a content-addressed zip in the artifact store (``stoker fn create --code DIR``).
    ``git``: a repository, branch and path, built by the builder on each push; the builder turns
    it into an archive, so agents only ever fetch archives.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    kind: Literal["archive", "git"] = "archive"
    digest: str | None = None
    """``sha256:<hex>`` of the archive's files (see ``services.common.artifacts``)."""
    uri: str | None = None
    """Where the archive can be fetched, e.g. ``file:///.../artifacts/sha256-<hex>.zip``."""
    size: int | None = None
    build_id: str | None = None
    pushed_ms: int = 0
    """When the push that produced this artifact arrived (git sources); later pushes win."""
    git_url: str | None = None
    git_branch: str | None = None
    git_path: str | None = None
    git_commit: str | None = None


class FunctionSpec(Record):
    """The desired state of one function."""

    type: Literal["function.spec"] = "function.spec"
    name: str
    entrypoint: str
    """``module:function`` inside the code, e.g. ``handler:main``."""
    source: CodeSource
    runtime: Literal["python3.11"] = "python3.11"
    revision: int = 1
    """Bumped by each writer of the spec (``fn update``, a build the pool manager activates).

    Nothing compares revisions: the newest record on the compacted ``functions`` topic is the spec.
    Writers read, modify and write, so two updates of one function at the same moment keep only the
    later one; the pool manager never activates a build over a later push (``source.pushed_ms``)."""
    memory_mb: int = Field(default=256, ge=16, le=65536)
    timeout_s: float = Field(default=30.0, gt=0, le=3600)
    concurrency: int = Field(default=100, ge=1, le=100_000)
    """Most invocations of this function in flight at once across the platform; more wait."""
    reuse: Literal["keep", "reset", "fresh"] = "keep"
    """How instances are reused: ``keep`` the module state; ``reset`` the function's part after each
    invocation and return the instance to the generic pool; ``fresh``: one invocation per instance."""
    reset_max_uses: int = Field(default=50, ge=1, le=100_000)
    """A ``reset`` instance is re-created after this many uses: no reset undoes everything."""
    cpu_millis: int = Field(default=1000, ge=10, le=64_000)
    """CPU quota of an instance, in millicores (1000 = one core)."""
    pids_limit: int = Field(default=64, ge=4, le=32_768)
    """Processes and threads an instance may have at once."""
    max_output_bytes: int = Field(default=1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    """What an instance may print per invocation before its output is cut (``output_truncated``)."""
    env: dict[str, str] = Field(default_factory=dict)
    network: Literal["none", "egress"] = "none"
    """``none``: the instance's own network namespace with loopback only (no broker, gateway, agent,
    other instances or anything else). ``egress``: the outside world too, never the platform's ports."""
    idle_s: float | None = Field(default=None, gt=0)
    """Keep-alive: an instance idle this long is recycled. ``None``: the platform's keep-alive
    policy decides (``fixed`` or the learned ``hybrid`` one)."""
    max_invocations: int | None = Field(default=None, ge=1)
    max_age_s: float | None = Field(default=None, gt=0)
    node_selector: dict[str, str] = Field(default_factory=lambda: {ROLE: "runtime"})
    """Labels a node must have to run this function (Kubernetes nodeSelector)."""
    tolerations: list[Toleration] = Field(default_factory=lambda: [RUNTIME_TOLERATION])
    """Taints of nodes this function may run on anyway (runtime nodes by default)."""
    normal_cpu_millis: float | None = Field(default=None, gt=0)
    """Overrides the platform-wide normal CPU range for this function (the throttler's bound)."""
    normal_memory_mb: float | None = Field(default=None, gt=0)
    """Overrides the platform-wide normal memory range for this function."""
    prewarm_on_commit: int = Field(default=1, ge=0, le=64)
    public: bool = False
    """Anyone who reaches the gateway may invoke it, without a token."""
    """Instances that must hold a new commit's code before it becomes the active version."""
    updated_ms: int = Field(default_factory=now_ms)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not FUNCTION_NAME.match(value):
            raise ValueError("function names are lowercase DNS labels: [a-z0-9-], at most 63 chars")
        return value

    @field_validator("entrypoint")
    @classmethod
    def _valid_entrypoint(cls, value: str) -> str:
        if not ENTRYPOINT.match(value):
            raise ValueError("entrypoint must look like module:function, e.g. handler:main")
        return value

    @property
    def code_version(self) -> str:
        """The version of the code: the commit for git sources, a short digest for archives."""
        if self.source.git_commit:
            return self.source.git_commit[:12]
        if self.source.digest:
            return self.source.digest.removeprefix("sha256:")[:12]
        return f"r{self.revision}"
