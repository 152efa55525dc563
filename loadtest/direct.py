"""The direct consumer: the least a Kafka-mediated execution can cost (the floor Stoker is compared with).

    python -m loadtest.direct --bootstrap HOST:PORT --prefix PREFIX --code DIR --entrypoint handler:main

One process consumes ``invocation.requested`` records from ``<prefix>invocation`` (a consumer group,
no auto-commit), calls the function in-process (the same code Stoker runs, imported once), and
produces the ``invocation.completed`` record to ``<prefix>result`` (key = invocation id) with the
platform's producer settings (idempotent, ``acks=all``); a batch's offsets are committed once its
results are confirmed, so its delivery is at-least-once like the platform's; commits go out at most
every second, in the background (awaiting a commit per record adds ~5 ms to each invocation here).
Two Kafka hops, no dispatcher, no pools, no instance processes, no isolation.

Because it speaks the public invocation contract on topics of its own prefix, the benchmarks
measure it with the very client code they measure Stoker with (``StokerClient`` on that prefix).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
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

from events import InvocationCompleted, InvocationRequested, Topics, TopicSpec, now_ms
from events.codec import DecodeError, decode, encode
from events.invocation import ErrorInfo, Timings
from events.topics import INVOCATION_PARTITIONS
from services.common.admin import ensure_topics
from services.common.kafkasec import client_options as kafka_client_options
from services.common.settings import CommonSettings

COMMIT_EVERY_S = 1.0
"""Confirmed offsets are committed at most this often (at-least-once: a crash re-runs at most this much)."""


def load_function(code_dir: Path, entrypoint: str) -> Callable[..., Any]:
    """Import ``module:function`` from ``code_dir`` once, as an instance does when specialized."""
    module_name, _, attr = entrypoint.partition(":")
    sys.path.insert(0, str(code_dir))
    module = importlib.import_module(module_name)
    fn: Callable[..., Any] = getattr(module, attr)
    return fn


async def run_function(fn: Callable[..., Any], payload: Any) -> Any:
    out = fn(payload)
    if asyncio.iscoroutine(out):
        out = await out
    return out


async def serve(bootstrap: str, prefix: str, fn: Callable[..., Any], ready_file: Path | None) -> None:
    topics = Topics(prefix)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, **kafka_client_options(), acks="all", enable_idempotence=True, linger_ms=0
    )
    consumer = AIOKafkaConsumer(
        topics.invocation,
        bootstrap_servers=bootstrap,
        **kafka_client_options(),
        group_id=f"{prefix}direct",
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # the topics are new per run: nothing published before is skipped
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await producer.start()
    await consumer.start()
    try:
        while not consumer.assignment():
            await asyncio.sleep(0.02)
        if ready_file is not None:
            ready_file.write_text(str(time.time()))
        committing: asyncio.Task[None] | None = None
        pending: dict[TopicPartition, int] = {}
        next_commit = 0.0
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=500)
            sent = []
            done: dict[TopicPartition, int] = {}
            for tp, records in batches.items():
                for rec in records:
                    done[tp] = rec.offset + 1
                    picked_ms = now_ms()
                    try:
                        inv = decode(rec.value, (InvocationRequested,))
                    except DecodeError:
                        continue
                    assert isinstance(inv, InvocationRequested)
                    started = time.perf_counter()
                    try:
                        output, status, error = await run_function(fn, inv.payload), "ok", None
                    except Exception as exc:  # a function that raised: an error result, like Stoker's
                        output, status, error = None, "error", ErrorInfo(kind=type(exc).__name__, message=str(exc))
                    exec_ms = (time.perf_counter() - started) * 1000
                    result = InvocationCompleted(
                        id=inv.id,
                        function=inv.function,
                        status=status,  # type: ignore[arg-type]
                        output=output,
                        error=error,
                        start="warm",
                        timings_ms=Timings(
                            queue=max(0.0, picked_ms - inv.requested_ms),
                            exec=round(exec_ms, 3),
                            total=max(0.0, now_ms() - inv.requested_ms),
                        ),
                        node="direct",
                    )
                    body = encode(result)
                    sent.append(await producer.send(topics.result, body, key=inv.id.encode()))
                    if inv.reply_to:
                        sent.append(await producer.send(inv.reply_to, body, key=inv.id.encode()))
            if sent:
                await asyncio.gather(*sent)
            pending.update(done)
            if pending and (committing is None or committing.done()) and time.monotonic() >= next_commit:
                # Confirmed results' offsets, at most every COMMIT_EVERY_S and in the background:
                # a commit per record, awaited, adds ~5 ms to every invocation on this machine.
                if committing is not None:
                    committing.result()
                committing = asyncio.create_task(consumer.commit(dict(pending)))
                pending.clear()
                next_commit = time.monotonic() + COMMIT_EVERY_S
        if committing is not None:
            await committing
        if pending:
            await consumer.commit(pending)
    finally:
        await consumer.stop()
        await producer.stop()


@contextmanager
def direct_consumer(
    settings: CommonSettings, code_dir: Path, entrypoint: str = "handler:main"
) -> Iterator[CommonSettings]:
    """Run a direct consumer process on ``settings``' broker; yields settings whose topics it serves.

    Its topics get a prefix of their own under the platform's (``<prefix>direct-<random>.``), so a
    ``StokerClient`` built from the yielded settings invokes it exactly as it invokes Stoker.
    """
    prefix = f"{settings.topic_prefix}direct-{uuid.uuid4().hex[:6]}."
    topics = Topics(prefix)
    hour = 3_600_000
    asyncio.run(
        ensure_topics(
            settings.bootstrap,
            [
                # As many partitions as ``stoker up`` gives the platform's: both sides decode the same.
                TopicSpec(topics.invocation, partitions=INVOCATION_PARTITIONS, retention_ms=hour),
                TopicSpec(topics.result, partitions=INVOCATION_PARTITIONS, retention_ms=hour),
            ],
        )
    )
    with tempfile.TemporaryDirectory(prefix="stoker-direct-") as tmp:
        ready = Path(tmp) / "ready"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "loadtest.direct",
                "--bootstrap",
                settings.bootstrap,
                "--prefix",
                prefix,
                "--code",
                str(code_dir),
                "--entrypoint",
                entrypoint,
                "--ready-file",
                str(ready),
            ],
            cwd=Path(__file__).resolve().parents[1],
        )
        try:
            deadline = time.monotonic() + 60
            while not ready.exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"the direct consumer exited {proc.returncode} before it was ready")
                if time.monotonic() > deadline:
                    raise RuntimeError("the direct consumer was not ready within 60 s")
                time.sleep(0.05)
            yield CommonSettings(
                home=settings.home,
                bootstrap=settings.bootstrap,
                topic_prefix=prefix,
                otlp_endpoint=settings.otlp_endpoint,
                log_level=settings.log_level,
            )
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--prefix", required=True, help="topic prefix: serves <prefix>invocation -> <prefix>result")
    parser.add_argument("--code", type=Path, required=True, help="folder of the function's code")
    parser.add_argument("--entrypoint", default="handler:main")
    parser.add_argument("--ready-file", type=Path, default=None, help="written once partitions are assigned")
    args = parser.parse_args(argv)
    fn = load_function(args.code, args.entrypoint)
    asyncio.run(serve(args.bootstrap, args.prefix, fn, args.ready_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
