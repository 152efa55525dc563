"""The node agent's hot path: Execute on a node's work topic -> result record, next to the direct consumer.

    python -m loadtest.agent_path [--bootstrap HOST:PORT] [--rates 100,200,400,800,1200,1600,2400,3200]
                                  [--step-s 5] [--sequential 500] [--systems direct,agent] [--profile DIR]

No dispatcher: one node agent runs as its own process (``python -m services.agent``, the way
``stoker up`` runs it, pool size 2, at most 8 instances) on a broker of its own (or ``--bootstrap``),
and this program writes ``Execute`` commands for the no-op function straight to the agent's work
topic, addressed to its incarnation, and waits for each ``invocation.completed`` on the result
topic. The direct consumer (``loadtest/direct.py``) is driven on the same broker by the same
generator with ``invocation.requested`` records. Per system:

- **sequential**: ``--sequential`` calls one after another (warm latency, p50/p99);
- **open loop**: rates stepped up as in ``python -m loadtest throughput`` (each record sent when
  due, latency from the due time, a step broken on >1% errors, p99 over ``--p99-limit-ms`` or <90%
  answered in time, a broken step repeated once, then one refinement). *Sustained* is the highest
  answered rate of a step that held.

``--profile DIR`` runs the agent under pyinstrument (``pip install -e '.[bench]'``) and writes its
profile of the whole run to ``DIR/agent-profile.txt`` and ``.html``.

Targets (the issue "The spine under load and under failure"): sustained >= 0.5x the direct
consumer's; warm sequential p50 <= 1.8x and p99 <= 3x the direct consumer's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from rich.table import Table

from events import Execute, FunctionSpec, InvocationRequested, Topics, codec, now_ms
from loadtest import harness, plots
from loadtest.direct import direct_consumer
from loadtest.floor import noop_code
from loadtest.harness import console, fmt
from loadtest.load import Breaking, Call, Outcome, closed_loop, describe, judge_step, open_loop, schedule
from loadtest.platform import LIBS, free_port
from loadtest.stats import ratio
from loadtest.throughput import next_rates, sustained
from services.cli import broker as kafka
from services.common.admin import ensure_topics
from services.common.client import package_code
from services.common.kafkasec import client_options as kafka_client_options
from services.common.runner import ready_file
from services.common.settings import CommonSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
NODE = "bench-0"
PAUSE_S = 1.0
TARGETS = {"sustained": 0.5, "sequential_p50": 1.8, "sequential_p99": 3.0}


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds used so far) of one process, from ``/proc``."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_of_tree(root: int) -> dict[str, float]:
    """CPU seconds of ``root`` (``self``) and of all its descendants (``children``: instances, zygote)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            parents[int(entry)], cpu[int(entry)] = st
    tree, frontier = set(), {root}
    while frontier:
        tree |= frontier
        frontier = {pid for pid, parent in parents.items() if parent in frontier and pid not in tree}
    return {"self": cpu.get(root, 0.0), "children": sum(cpu[p] for p in tree - {root} if p in cpu)}


def pid_of(marker: str) -> int | None:
    """The process whose command line contains ``marker`` (the direct consumer, by its topic prefix)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    return int(entry)
            except OSError:
                continue
    return None


@contextmanager
def own_broker() -> Iterator[tuple[str, int]]:
    """A single-node broker on free loopback ports in a temporary folder; yields its bootstrap and pid."""
    with tempfile.TemporaryDirectory(prefix="stoker-agent-path-") as tmp:
        cfg = kafka.BrokerConfig(
            home=Path(tmp) / "broker",
            port=free_port(),
            controller_port=free_port(),
            libs_dir=Path(os.environ.get("STOKER_KAFKA_LIBS", str(LIBS))),
        )
        proc = kafka.launch(cfg, REPO_ROOT, timeout_s=90)
        try:
            yield cfg.bootstrap, proc.pid
        finally:
            kafka.stop_broker(proc, timeout_s=30)


@contextmanager
def agent_process(settings: CommonSettings, profile: Path | None) -> Iterator[tuple[str, int]]:
    """One node agent as its own process; yields its incarnation and pid once it is ready."""
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "STOKER_HOME": str(settings.home),
        "STOKER_BOOTSTRAP": settings.bootstrap,
        "STOKER_TOPIC_PREFIX": settings.topic_prefix,
        "STOKER_NODE_NAME": NODE,
        "STOKER_POOL_SIZE": "2",
        "STOKER_MAX_INSTANCES": "8",
    }
    cmd = [sys.executable, "-m", "services.agent"]
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        out = profile / "agent-profile.pyisession"
        cmd = [sys.executable, "-m", "pyinstrument", "-r", "session", "-o", str(out), "-m", "services.agent"]
    ready = ready_file(settings, f"agent-{NODE}")
    log_path = settings.logs_dir / f"agent-{NODE}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=REPO_ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"the agent exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agent was not ready in 60 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        yield str(codec.loads(ready.read_bytes())["incarnation"]), proc.pid
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if profile is not None:
            session = profile / "agent-profile.pyisession"
            for renderer, suffix in (("text", "txt"), ("html", "html")):
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "pyinstrument",
                        "--load",
                        str(session),
                        "-r",
                        renderer,
                        "-o",
                        str(profile / f"agent-profile.{suffix}"),
                    ],
                    check=False,
                )
            console.print(f"agent profile in {profile}/agent-profile.txt and .html")


class Driver:
    """Writes one record per call to ``topic`` and waits for the result record with its id."""

    def __init__(
        self, bootstrap: str, topic: str, result_topic: str, record: Callable[[str], tuple[bytes, bytes]]
    ) -> None:
        self.topic, self.result_topic, self.record = topic, result_topic, record
        # The platform's producer settings (idempotent, acks=all, no linger), like StokerClient's.
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, **kafka_client_options(), acks="all", enable_idempotence=True, linger_ms=0
        )
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, **kafka_client_options(), enable_auto_commit=False, fetch_max_wait_ms=50
        )
        self._waiting: dict[str, asyncio.Future[Outcome]] = {}
        self._follow: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Driver:
        await self._producer.start()
        await self._consumer.start()
        partitions = await self._producer.partitions_for(self.result_topic)
        tps = [TopicPartition(self.result_topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:
            await self._consumer.position(tp)  # fixed before the first call: no result is missed
        self._follow = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._follow is not None:
            self._follow.cancel()
        await self._consumer.stop()
        await self._producer.stop()

    async def _read(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=100, max_records=1000)
            for records in batches.values():
                for rec in records:
                    result = codec.loads(rec.value)
                    future = self._waiting.pop(result.get("id"), None)
                    if future is not None and not future.done():
                        future.set_result(Outcome(result["status"], result.get("start"), result.get("timings_ms")))

    def call(self, timeout_s: float = 30.0) -> Call:
        async def one() -> Outcome:
            inv_id = uuid.uuid4().hex
            future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
            self._waiting[inv_id] = future
            key, value = self.record(inv_id)
            try:
                await self._producer.send(self.topic, value, key=key)
                return await asyncio.wait_for(future, timeout_s)
            except TimeoutError:
                return Outcome("client_timeout")
            except KafkaError as exc:  # the broker did not take the request (a saturated machine)
                return Outcome(f"send_failed:{type(exc).__name__}")
            finally:
                self._waiting.pop(inv_id, None)

        return one


def execute_records(spec: FunctionSpec, incarnation: str) -> Callable[[str], tuple[bytes, bytes]]:
    """Execute commands of ``spec`` for ``incarnation``, as the dispatcher writes them."""
    template = Execute(
        invocation=InvocationRequested(id="template", function=spec.name), spec=spec, incarnation=incarnation
    ).model_dump(mode="json")
    key = spec.name.encode()

    def record(inv_id: str) -> tuple[bytes, bytes]:
        now = now_ms()
        body = {**template, "dispatched_ms": now}
        body["invocation"] = {**template["invocation"], "id": inv_id, "requested_ms": now}
        return key, codec.encode_value(body)

    return record


def invocation_records(function: str) -> Callable[[str], tuple[bytes, bytes]]:
    """``invocation.requested`` records, as any Kafka client writes them."""
    template = InvocationRequested(id="template", function=function).model_dump(mode="json")
    key = function.encode()

    def record(inv_id: str) -> tuple[bytes, bytes]:
        return key, codec.encode_value({**template, "id": inv_id, "requested_ms": now_ms()})

    return record


async def measure(
    make_driver: Callable[[], Driver],
    label: str,
    sequential: int,
    rates: list[float],
    step_s: float,
    rule: Breaking,
    cpu: Callable[[], dict[str, float]],
) -> dict[str, Any]:
    """Sequential warm calls, then the open-loop ramp, against one system.

    ``cpu`` gives the measured processes' CPU seconds so far: each step reports what they used
    per answered invocation (``cpu_ms_per_call``), a figure the other load on a shared machine
    moves far less than latency.
    """
    out: dict[str, Any] = {}
    async with make_driver() as driver:
        call = driver.call()
        await closed_loop(call, 30, 1)
        await closed_loop(call, 400, 16)  # instances, connections and caches for the concurrency to come
        if sequential:
            samples, wall = await closed_loop(call, sequential, 1)
            out["sequential"] = describe(samples, wall)
            seq = out["sequential"]["latency_ms"]
            console.print(f"  {label} sequential: p50 {seq.get('p50')} ms, p99 {seq.get('p99')} ms")
            await asyncio.sleep(PAUSE_S)
        steps: list[dict[str, Any]] = []
        while (rate := next_rates(rates, [s for s in steps if not s.get("repeated")], refine=True)) is not None:
            for attempt in (1, 2):
                before = cpu()
                samples, _ = await open_loop(call, schedule(rate, step_s))
                after = cpu()
                step = judge_step(samples, rate, step_s, rule)
                split = describe(samples, step_s).get("platform_split_ms")
                if split:  # the system's own queue / start / exec / total, per step
                    step["platform_split_p50_ms"] = {k: v.get("p50") for k, v in split.items()}
                if step["ok"]:
                    step["cpu_ms_per_call"] = {k: round((after[k] - before[k]) * 1000 / step["ok"], 3) for k in after}
                steps.append(step)
                verdict = f"broken: {step['why']}" if step["broken"] else "held"
                console.print(
                    f"  {label} {rate:g}/s: answered {step['achieved_per_s']}/s, p50 "
                    f"{step['latency_ms'].get('p50')} ms, p99 {step['latency_ms'].get('p99')} ms, "
                    f"send lag p99 {step['send_lag_ms'].get('p99')} ms, "
                    f"CPU ms/call {step.get('cpu_ms_per_call')}, "
                    f"split p50 {step.get('platform_split_p50_ms')} -> {verdict}"
                )
                await asyncio.sleep(PAUSE_S)
                if not step["broken"] or attempt == 2:
                    break
                step["repeated"] = True  # one stall of a shared 2-core machine must not end the ramp
        out["steps"] = steps
        out["sustained_per_s"] = sustained(steps)
        out["held_every_rate"] = bool(steps) and not any(s["broken"] and not s.get("repeated") for s in steps)
    return out


def run(
    args: argparse.Namespace, bootstrap: str, broker_pid: int | None, report: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    rates = sorted(float(r) for r in args.rates.split(",") if r)
    rule = Breaking(max_error_share=args.max_error_share, p99_limit_ms=args.p99_limit_ms)
    systems = [s for s in args.systems.split(",") if s]
    runs: dict[str, dict[str, Any]] = {}

    def common_cpu() -> dict[str, float]:
        """The broker's CPU (when this program started it) and the generator's own."""
        out = {"generator": cpu_of_tree(os.getpid())["self"]}
        if broker_pid is not None:
            out["broker"] = cpu_of_tree(broker_pid)["self"]
        return out

    with tempfile.TemporaryDirectory(prefix="stoker-agent-path-home-") as home:
        settings = CommonSettings(home=Path(home), bootstrap=bootstrap, topic_prefix=f"ap{uuid.uuid4().hex[:6]}.")
        report["platform"] = {"bootstrap": bootstrap, "topic_prefix": settings.topic_prefix}
        with noop_code() as code:
            if "direct" in systems:
                with direct_consumer(settings, code) as direct:
                    records = invocation_records("noop")
                    consumer_pid = pid_of(direct.topic_prefix)
                    assert consumer_pid is not None, "the direct consumer process is not to be found"

                    def direct_cpu() -> dict[str, float]:
                        return {"direct": cpu_of_tree(consumer_pid)["self"], **common_cpu()}

                    def direct_driver() -> Driver:
                        return Driver(bootstrap, direct.topics.invocation, direct.topics.result, records)

                    runs["direct consumer"] = asyncio.run(
                        measure(direct_driver, "direct", args.sequential, rates, args.step_s, rule, direct_cpu)
                    )
            if "agent" in systems:
                topics = Topics(settings.topic_prefix)
                asyncio.run(
                    ensure_topics(bootstrap, [*topics.catalogue(invocation_partitions=3), topics.work_spec(NODE)])
                )
                spec = FunctionSpec(name="noop", entrypoint="handler:main", source=package_code(settings, code))
                with agent_process(settings, args.profile) as (incarnation, agent_pid):
                    commands = execute_records(spec, incarnation)

                    def agent_cpu() -> dict[str, float]:
                        tree = cpu_of_tree(agent_pid)
                        return {"agent": tree["self"], "instances": tree["children"], **common_cpu()}

                    def agent_driver() -> Driver:
                        return Driver(bootstrap, topics.work(NODE), topics.result, commands)

                    runs["agent"] = asyncio.run(
                        measure(agent_driver, "agent", args.sequential, rates, args.step_s, rule, agent_cpu)
                    )
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="100,200,400,800,1200,1600,2400,3200", help="offered rates, /s")
    parser.add_argument("--step-s", type=float, default=5.0, help="seconds per rate")
    parser.add_argument("--sequential", type=int, default=500, help="sequential warm calls per system")
    parser.add_argument("--p99-limit-ms", type=float, default=250.0, help="a step with a higher p99 is broken")
    parser.add_argument("--max-error-share", type=float, default=0.01)
    parser.add_argument("--systems", default="direct,agent", help="which to measure: direct, agent")
    parser.add_argument("--profile", type=Path, default=None, help="run the agent under pyinstrument; profile here")
    harness.add_common_args(parser)
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the agent and the broker this program started are stopped too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    report = harness.new_report(
        "agent_path",
        args,
        {
            "rates": args.rates,
            "step_s": args.step_s,
            "sequential": args.sequential,
            "systems": args.systems,
            "function": "no-op (loadtest.spine.NOOP), reuse keep",
            "path": "Execute on the work topic -> agent -> result (agent); invocation -> result (direct)",
            "agent": {"pool_size": 2, "max_instances": 8, "profiled": args.profile is not None},
        },
    )
    if args.bootstrap:
        runs = run(args, args.bootstrap, None, report)
    else:
        with own_broker() as (bootstrap, broker_pid):
            runs = run(args, bootstrap, broker_pid, report)
    report["runs"] = runs
    direct, agent = runs.get("direct consumer", {}), runs.get("agent", {})
    seq_d = direct.get("sequential", {}).get("latency_ms", {})
    seq_a = agent.get("sequential", {}).get("latency_ms", {})
    report["agent_over_direct"] = {
        "sustained": ratio(agent.get("sustained_per_s"), direct.get("sustained_per_s")),
        "sequential_p50": ratio(seq_a.get("p50"), seq_d.get("p50")),
        "sequential_p99": ratio(seq_a.get("p99"), seq_d.get("p99")),
    }
    report["targets"] = TARGETS
    table = Table(
        "system",
        "offered /s",
        "answered /s",
        "p50 ms",
        "p99 ms",
        "errors",
        "send lag p99 ms",
        "verdict",
        title="Open loop, latency from the due time",
    )
    for label, figures in runs.items():
        for s in figures.get("steps", []):
            table.add_row(
                label,
                fmt(s["offered_per_s"], 0),
                fmt(s["achieved_per_s"], 0),
                fmt(s["latency_ms"].get("p50")),
                fmt(s["latency_ms"].get("p99")),
                fmt(s["errors"]),
                fmt(s["send_lag_ms"].get("p99")),
                ("repeated, " if s.get("repeated") else "") + (f"broken: {s['why']}" if s["broken"] else "held"),
            )
    console.print(table)
    summary = Table("system", "sequential p50 ms", "sequential p99 ms", "sustained /s", title="Summary")
    for label, figures in runs.items():
        seq = figures.get("sequential", {}).get("latency_ms", {})
        held = ">= " if figures.get("held_every_rate") else ""
        summary.add_row(label, fmt(seq.get("p50")), fmt(seq.get("p99")), held + fmt(figures.get("sustained_per_s"), 0))
    console.print(summary)
    ratios = report["agent_over_direct"]
    console.print(
        f"agent / direct: sustained {fmt(ratios['sustained'])} (target >= {TARGETS['sustained']:g}), "
        f"sequential p50 {fmt(ratios['sequential_p50'])} (<= {TARGETS['sequential_p50']:g}), "
        f"p99 {fmt(ratios['sequential_p99'])} (<= {TARGETS['sequential_p99']:g})"
    )
    if not args.no_plot:
        png = plots.throughput_curves(
            {label: figures.get("steps", []) for label, figures in runs.items()},
            harness.plot_path(args.out, "agent_path", "curves"),
            "Execute -> result through one agent vs the direct consumer",
        )
        report["plots"] = [png.name] if png else []
    harness.save(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
