"""Code prewarm benchmark: webhook -> prewarmed-ready time, and the first call after a commit.

    python -m loadtest.prewarm [--rounds 5] [--warm 50]

Starts its own platform (free ports, a temporary state folder, pip pointed at a local wheel folder
so the "one small requirement" installs the same way every run), binds two functions to a real git
repository (one without requirements, one with one small requirement), and for each round commits,
pushes, delivers a signed webhook and waits for the prewarm to complete and the version to switch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from rich.console import Console
from rich.table import Table

from events import PrewarmCompleted, RepoConfigured
from loadtest.platform import STOKER, own_platform
from loadtest.stats import machine_facts, summary
from services.cli.broker import KAFKA_VERSION
from services.common.client import StokerClient
from services.common.settings import CommonSettings
from services.gateway.webhooks import sign

console = Console()
SECRET = "bench-secret"


def sh(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "b",
        "GIT_AUTHOR_EMAIL": "b@x",
        "GIT_COMMITTER_NAME": "b",
        "GIT_COMMITTER_EMAIL": "b@x",
    }
    return subprocess.run(args, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def handler(n: int, dep: bool) -> str:
    head = "import tinydep\n" if dep else ""
    value = "tinydep.ANSWER" if dep else "0"
    return f"{head}\ndef main(event):\n    return {{'round': {n}, 'dep': {value}}}\n"


async def run_rounds(
    common: CommonSettings, http: str, repo: Path, remote: Path, rounds: int, warm: int
) -> dict[str, Any]:
    completed: dict[str, PrewarmCompleted] = {}
    figures: dict[str, dict[str, list[float]]] = {
        name: {"webhook_to_ready_ms": [], "prewarm_ms": [], "first_call_ms": [], "first_exec_path_ms": []}
        for name in ("nodeps", "withdep")
    }
    kinds: dict[str, dict[str, int]] = {"nodeps": {}, "withdep": {}}
    warm_ms: list[float] = []
    async with StokerClient(common) as client:
        # Other record types on the topic fail the expected type and are skipped by the tail.
        tail = client.reader.tail(
            common.topics.prewarm,
            (PrewarmCompleted,),
            lambda e: completed.__setitem__(e.commit or "", e) if isinstance(e, PrewarmCompleted) else None,
        )
        await tail.start()
        await client.send(
            RepoConfigured(repo=remote.as_uri(), webhook_secret=SECRET), common.topics.repo, remote.as_uri()
        )
        for n in range(1, rounds + 1):
            for name, dep in (("nodeps", False), ("withdep", True)):
                (repo / name / "handler.py").write_text(handler(n, dep))
                sh(repo, "git", "commit", "-qam", f"{name} round {n}")
                sh(repo, "git", "push", "-q", "origin", "main")
                sha = sh(repo, "git", "rev-parse", "HEAD")
                body = json.dumps(
                    {
                        "ref": "refs/heads/main",
                        "before": "0" * 40,
                        "after": sha,
                        "repository": {"clone_url": remote.as_uri()},
                        "commits": [{"added": [], "modified": [f"{name}/handler.py"], "removed": []}],
                    }
                ).encode()
                started = time.perf_counter()
                answer = httpx.post(
                    f"{http}/webhooks/git",
                    content=body,
                    timeout=30,
                    headers={
                        "X-GitHub-Event": "push",
                        "X-GitHub-Delivery": f"{name}-{n}-{sha}",
                        "X-Hub-Signature-256": sign(SECRET, body),
                    },
                )
                answer.raise_for_status()
                while sha not in completed:
                    if time.perf_counter() - started > 120:
                        raise RuntimeError(f"no prewarm completed for {name} at {sha}")
                    await asyncio.sleep(0.005)
                done = completed[sha]
                if done.status != "ready" or not done.activated:
                    raise RuntimeError(f"prewarm of {name} at {sha} ended {done.status}: {done.reason}")
                figures[name]["webhook_to_ready_ms"].append((time.perf_counter() - started) * 1000)
                figures[name]["prewarm_ms"].append(done.duration_ms)
                # The version switch is a spec update: wait until the dispatcher routes to it.
                while True:
                    call_started = time.perf_counter()
                    result = await client.invoke(name, None, timeout_s=30)
                    if result.output and result.output.get("round") == n:
                        break
                    await asyncio.sleep(0.01)
                figures[name]["first_call_ms"].append((time.perf_counter() - call_started) * 1000)
                figures[name]["first_exec_path_ms"].append(result.timings_ms.start)
                kinds[name][result.start or "?"] = kinds[name].get(result.start or "?", 0) + 1
        for _ in range(warm):
            call_started = time.perf_counter()
            await client.invoke("nodeps", None, timeout_s=30)
            warm_ms.append((time.perf_counter() - call_started) * 1000)
    return {"figures": figures, "first_call_start_kinds": kinds, "warm_ms": warm_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warm", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    args = parser.parse_args(argv)
    from tests.gitrepo import make_wheel  # the same hand-made wheel the tests use

    with tempfile.TemporaryDirectory(prefix="stoker-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        wheels = tmp / "wheels"
        make_wheel(wheels, "tinydep", "0.1", "ANSWER = 42\n")
        remote, repo = tmp / "remote.git", tmp / "repo"
        sh(tmp, "git", "init", "-q", "--bare", "-b", "main", str(remote))
        sh(tmp, "git", "init", "-q", "-b", "main", str(repo))
        sh(repo, "git", "remote", "add", "origin", str(remote))
        for name, dep in (("nodeps", False), ("withdep", True)):
            (repo / name).mkdir()
            (repo / name / "handler.py").write_text(handler(0, dep))
        (repo / "withdep" / "requirements.txt").write_text("tinydep==0.1\n")
        sh(repo, "git", "add", "-A")
        sh(repo, "git", "commit", "-qm", "round 0")
        sh(repo, "git", "push", "-q", "origin", "main")
        extra = {"STOKER_PIP_ARGS": f"--no-index --find-links {wheels}"}
        console.print("starting a platform for the benchmark")
        with own_platform(extra) as (env, http):
            for name in ("nodeps", "withdep"):
                subprocess.run(
                    [
                        STOKER,
                        "fn",
                        "create",
                        name,
                        "--git",
                        remote.as_uri(),
                        "--path",
                        name,
                        "--entrypoint",
                        "handler:main",
                    ],
                    env=env,
                    check=True,
                    capture_output=True,
                )
            common = CommonSettings.from_env(env)
            time.sleep(3)  # let the first builds (round 0) finish
            outcome = asyncio.run(run_rounds(common, http, repo, remote, args.rounds, args.warm))
    report: dict[str, Any] = {
        "scenario": "prewarm",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_facts(KAFKA_VERSION),
        "inputs": {"rounds": args.rounds, "warm": args.warm},
        "figures": {name: {k: summary(v) for k, v in f.items()} for name, f in outcome["figures"].items()},
        "first_call_start_kinds": outcome["first_call_start_kinds"],
        "warm_call_ms": summary(outcome["warm_ms"]),
    }
    table = Table(
        "function",
        "webhook -> prewarmed & active p50",
        "max",
        "prewarm step p50",
        "first call after commit p50",
        "start kinds",
        title="code prewarm",
    )
    for name, f in report["figures"].items():
        table.add_row(
            name,
            f"{f['webhook_to_ready_ms']['p50']} ms",
            f"{f['webhook_to_ready_ms']['max']} ms",
            f"{f['prewarm_ms']['p50']} ms",
            f"{f['first_call_ms']['p50']} ms",
            str(report["first_call_start_kinds"][name]),
        )
    console.print(table)
    console.print(
        f"warm call of the same function: p50 {report['warm_call_ms']['p50']} ms, "
        f"p99 {report['warm_call_ms']['p99']} ms"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"prewarm-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    console.print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
