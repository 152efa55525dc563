"""Load generators: closed loop (N callers, each waits for its answer) and open loop (a fixed arrival rate).

A *call* is an ``async`` function that performs one invocation through the measured path and
returns its :class:`Outcome`; the generators time it. The open loop measures each latency from the
moment the request was *due*, not from when the generator got round to sending it, so a generator
that falls behind shows up as latency instead of silently lowering the offered load (coordinated
omission); how far it fell behind is reported separately as ``send_lag``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from aiokafka.errors import KafkaError

from loadtest.stats import latency_summary, percentile
from services.common.client import StokerClient


@dataclass(frozen=True)
class Outcome:
    """What one invocation ended as."""

    status: str
    """``ok`` or the platform's terminal status; ``client_timeout`` / ``http_<code>`` / ``exception``."""
    start: str | None = None
    timings_ms: dict[str, float] | None = None
    """The platform's own split (queue, start, exec, total), when it returned one."""


@dataclass(frozen=True)
class Sample:
    """One timed invocation."""

    due_s: float
    """When it was due, seconds from the start of the run."""
    sent_s: float
    """When the generator started it, seconds from the start of the run."""
    latency_ms: float
    """From due (open loop) or sent (closed loop) to the answer."""
    outcome: Outcome

    @property
    def ok(self) -> bool:
        return self.outcome.status == "ok"


Call = Callable[[], Awaitable[Outcome]]


async def start_results(client: StokerClient) -> None:
    """Have ``client`` follow the result topic before concurrent calls begin.

    ``StokerClient`` starts its result tail on the first ``invoke``; calls made concurrently with
    that first one do not wait for the tail to be positioned and can miss their result (seen as a
    client timeout). One call of a function that does not exist (answered ``rejected``) first
    avoids that without touching any benchmarked function.
    """
    result = await client.invoke(f"bench-probe-{uuid.uuid4().hex[:8]}", None, timeout_s=60)
    if result.status != "rejected":
        raise RuntimeError(f"the probe of a missing function ended {result.status}, not rejected")


def kafka_call(client: StokerClient, function: str, payload: Any = None, timeout_s: float = 30.0) -> Call:
    """Invoke over Kafka through ``StokerClient``: publish to ``invocation``, wait on ``result``."""

    async def call() -> Outcome:
        try:
            result = await client.invoke(function, payload, timeout_s=timeout_s)
        except TimeoutError:
            return Outcome("client_timeout")
        except KafkaError as exc:  # e.g. the client's own send buffer full past a rate it cannot offer
            return Outcome(f"exception:{type(exc).__name__}")
        return Outcome(result.status, result.start, result.timings_ms.model_dump())

    return call


def http_call(http: httpx.AsyncClient, function: str, body: bytes = b"null") -> Call:
    """Invoke through the gateway: ``POST /fn/NAME`` (synchronous: 200 + the output)."""

    async def call() -> Outcome:
        try:
            answer = await http.post(f"/fn/{function}", content=body, headers={"content-type": "application/json"})
        except httpx.TimeoutException:
            return Outcome("client_timeout")
        except httpx.HTTPError as exc:
            return Outcome(f"exception:{type(exc).__name__}")
        status = "ok" if answer.status_code == 200 else f"http_{answer.status_code}"
        return Outcome(status, answer.headers.get("x-stoker-start"), server_timing(answer.headers.get("server-timing")))

    return call


def server_timing(header: str | None) -> dict[str, float] | None:
    """``queue;dur=0.4, exec;dur=0.2`` -> ``{"queue": 0.4, "exec": 0.2}``."""
    if not header:
        return None
    out: dict[str, float] = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";")
        for attr in rest.split(";"):
            key, _, value = attr.strip().partition("=")
            if key == "dur":
                try:
                    out[name.strip()] = float(value)
                except ValueError:
                    pass
    return out or None


async def closed_loop(
    call: Call, n: int, concurrency: int = 1, on_done: Callable[[], None] | None = None
) -> tuple[list[Sample], float]:
    """``n`` calls by ``concurrency`` callers, each sending its next one when its answer arrived.

    Returns the samples and the wall time in seconds (throughput = n / wall).
    """
    samples: list[Sample] = []
    remaining = n
    t0 = time.perf_counter()

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            sent = time.perf_counter()
            outcome = await call()
            done = time.perf_counter()
            samples.append(Sample(sent - t0, sent - t0, (done - sent) * 1000, outcome))
            if on_done is not None:
                on_done()

    await asyncio.gather(*(caller() for _ in range(max(1, min(concurrency, n)))))
    return samples, time.perf_counter() - t0


def schedule(rate_per_s: float, duration_s: float) -> list[float]:
    """Due times (seconds) of an open-loop step: evenly spaced at ``rate_per_s`` for ``duration_s``."""
    count = int(round(rate_per_s * duration_s))
    return [i / rate_per_s for i in range(count)]


async def open_loop(
    call: Call, due: list[float], on_done: Callable[[], None] | None = None, drain_timeout_s: float = 60.0
) -> tuple[list[Sample], float]:
    """Start a call at each due time (seconds from now), whether or not earlier ones have answered.

    Returns the samples (latency from the due time) and the seconds until the last answer.
    """
    samples: list[Sample] = []
    tasks: list[asyncio.Task[None]] = []
    t0 = time.perf_counter()

    async def one(due_s: float) -> None:
        sent = time.perf_counter() - t0
        outcome = await call()
        done = time.perf_counter() - t0
        samples.append(Sample(due_s, sent, (done - due_s) * 1000, outcome))
        if on_done is not None:
            on_done()

    for due_s in due:
        delay = due_s - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due_s)))
    if tasks:
        finished, pending = await asyncio.wait(tasks, timeout=drain_timeout_s)
        for task in pending:
            task.cancel()
        for task in finished:
            task.result()
    return samples, time.perf_counter() - t0


def describe(samples: list[Sample], wall_s: float) -> dict[str, Any]:
    """Latency percentiles, statuses, start kinds and throughput of one run."""
    ok = [s.latency_ms for s in samples if s.ok]
    statuses = Counter(s.outcome.status for s in samples)
    starts = Counter(s.outcome.start or "?" for s in samples if s.ok)
    out: dict[str, Any] = {
        "latency_ms": latency_summary(ok),
        "requests": len(samples),
        "ok": len(ok),
        "errors": len(samples) - len(ok),
        "statuses": dict(statuses),
        "start_kinds": dict(starts),
        "wall_s": round(wall_s, 3),
        "throughput_per_s": round(len(ok) / wall_s, 1) if wall_s > 0 else None,
    }
    parts: dict[str, list[float]] = {}
    for s in samples:
        for key, value in (s.outcome.timings_ms or {}).items():
            parts.setdefault(key, []).append(value)
    if parts:
        out["platform_split_ms"] = {k: latency_summary(v) for k, v in parts.items()}
    return out


@dataclass(frozen=True)
class Breaking:
    """When an open-loop step counts as broken."""

    max_error_share: float = 0.01
    p99_limit_ms: float = 250.0
    min_achieved_share: float = 0.9
    """Answers per second over the step, as a share of the offered rate."""


def judge_step(samples: list[Sample], rate_per_s: float, duration_s: float, rule: Breaking) -> dict[str, Any]:
    """Figures of one open-loop step and whether it broke (and why)."""
    ok = sorted(s.latency_ms for s in samples if s.ok)
    n = len(samples)
    errors = n - len(ok)
    expected = int(round(rate_per_s * duration_s))
    # Answers that arrived within the step's window plus a grace of the p99 limit count as sustained.
    window_end = duration_s + rule.p99_limit_ms / 1000
    in_window = sum(1 for s in samples if s.ok and s.due_s + s.latency_ms / 1000 <= window_end)
    lags = sorted((s.sent_s - s.due_s) * 1000 for s in samples)
    p99 = percentile(ok, 99) if ok else float("inf")
    reasons = []
    if expected and (errors + (expected - n)) / expected > rule.max_error_share:
        reasons.append(f"errors {errors + expected - n}/{expected}")
    if p99 > rule.p99_limit_ms:
        reasons.append(f"p99 {p99:.0f} ms > {rule.p99_limit_ms:.0f} ms")
    if in_window < rule.min_achieved_share * expected:
        reasons.append(f"answered {in_window}/{expected} in time")
    return {
        "offered_per_s": rate_per_s,
        "duration_s": duration_s,
        "requests": n,
        "ok": len(ok),
        "errors": errors + (expected - n),
        "statuses": dict(Counter(s.outcome.status for s in samples)),
        "achieved_per_s": round(in_window / duration_s, 1) if duration_s else None,
        "latency_ms": latency_summary(ok),
        "send_lag_ms": {"p50": round(percentile(lags, 50), 3), "p99": round(percentile(lags, 99), 3)} if lags else {},
        "broken": bool(reasons),
        "why": "; ".join(reasons),
    }
