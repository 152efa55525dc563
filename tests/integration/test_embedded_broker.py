"""Integration test: the embedded KRaft broker starts, serves aiokafka, stops.

Nothing is skipped: a missing mvn/java, a failed fetch or a broker that never
becomes ready fails the test with the tool output / broker log tail in the
message (BrokerError carries them).

The jars are shared with `make up` through the project's state folder
(`<repo>/.stoker/kafka/libs`, or $STOKER_KAFKA_LIBS), so only the first run on
a machine pays for the Maven fetch; the broker's data and logs live in a
temporary home per test.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# Make `services.cli.broker` importable however pytest was configured.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402

from services.cli import broker  # noqa: E402


def _free_port_pair() -> tuple[int, int]:
    """Two distinct free loopback ports (broker, controller)."""
    socks = []
    try:
        for _ in range(2):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return socks[0].getsockname()[1], socks[1].getsockname()[1]
    finally:
        for s in socks:
            s.close()


def _shared_libs_dir() -> Path:
    env = os.environ.get("STOKER_KAFKA_LIBS")
    return Path(env) if env else REPO_ROOT / ".stoker" / "kafka" / "libs"


async def _roundtrip(bootstrap: str, topic: str) -> None:
    """Create a topic, produce one record idempotently, consume it in a group, commit."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name=topic, num_partitions=1, replication_factor=1)])
        # The controller confirms the creation before the broker's metadata shows it (KRaft propagates
        # it a moment later): look again for a few seconds rather than once.
        deadline = time.monotonic() + 10
        while topic not in await admin.list_topics() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert topic in await admin.list_topics()
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, key=b"k", value=b"hello stoker")
        assert meta.offset == 0
    finally:
        await producer.stop()

    tp = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"{topic}-group",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=30)
        assert (record.key, record.value, record.offset) == (b"k", b"hello stoker", 0)
        await consumer.commit()
        assert await consumer.committed(tp) == 1
    finally:
        await consumer.stop()


def test_embedded_broker_roundtrip(tmp_path: Path) -> None:
    t0 = time.monotonic()
    libs = broker.fetch_artifacts(tmp_path, REPO_ROOT, _shared_libs_dir())
    fetch_s = time.monotonic() - t0
    assert broker.libs_version(libs) == broker.KAFKA_VERSION

    port, controller_port = _free_port_pair()
    cfg = broker.BrokerConfig(home=tmp_path, port=port, controller_port=controller_port, libs_dir=libs)
    broker.write_config(cfg)
    assert broker.format_storage(cfg) is True
    assert broker.format_storage(cfg) is False  # idempotent once meta.properties exists

    assert not broker.broker_is_reachable(cfg.host, cfg.port)
    proc = broker.start_broker(cfg)
    try:
        ready_s = broker.wait_until_ready(cfg, timeout_s=90, proc=proc)
        assert broker.broker_is_reachable(cfg.host, cfg.port)
        # The controller listener speaks Kafka too but offers no Produce API.
        assert not broker.broker_is_reachable(cfg.host, cfg.controller_port)
        try:
            asyncio.run(_roundtrip(cfg.bootstrap, f"stoker-it-{uuid.uuid4().hex[:8]}"))
        except Exception as exc:
            raise AssertionError(f"Kafka round trip failed: {exc!r}\n{broker.log_tails(cfg)}") from exc
    finally:
        broker.stop_broker(proc, timeout_s=30)

    assert proc.poll() is not None, "broker still running after stop_broker"
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # the whole process group is gone
    assert not broker.broker_is_reachable(cfg.host, cfg.port)
    # Logs went to the state folder, not stdout.
    assert "Kafka Server started" in cfg.server_log.read_text(encoding="utf-8", errors="replace")
    print(f"fetch {fetch_s:.2f}s, ready {ready_s:.2f}s")


def test_broker_config_is_loopback_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        broker.BrokerConfig(home=tmp_path, host="0.0.0.0")
    props = broker.BrokerConfig(home=tmp_path).properties()
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert props["log.dirs"] == str(tmp_path / "kafka" / "data")


def test_stop_broker_refuses_foreign_pid() -> None:
    # A stale pid file must not make stop_broker kill an unrelated process.
    with pytest.raises(broker.BrokerError):
        broker.stop_broker(os.getpid())
