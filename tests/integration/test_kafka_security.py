"""Stoker's Kafka clients over a SASL_SSL listener of a real broker: certificates and SCRAM users made here.

The broker keeps its loopback PLAINTEXT listener (the readiness probe and inter-broker traffic use it); every
client under test dials only the SASL_SSL one.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from events import Topics, codec
from services.cli import broker as kafka
from services.common.admin import ensure_topics
from services.common.kafkasec import KafkaSecurity, client_options
from services.common.settings import CommonSettings
from tests.helpers import REPO_ROOT, free_ports, shared_libs_dir

USER, PASSWORD = "stoker-svc", "s3cret-" + uuid.uuid4().hex[:8]


def openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"openssl {' '.join(args)}: {res.stderr}"


def make_ca_and_cert(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a certificate it signed for 127.0.0.1/localhost: (ca.pem, cert+key pem, key.pem)."""
    folder.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}-ca",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=folder)  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "broker.key",
            "-out", "broker.csr", cwd=folder)  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "san.ext", "-out", "broker.pem", cwd=folder)  # fmt: skip
    # Kafka's PEM keystore: the PKCS#8 key and its certificate in one file.
    openssl("pkcs8", "-topk8", "-nocrypt", "-in", "broker.key", "-out", "broker.pk8", cwd=folder)
    keystore = folder / "keystore.pem"
    keystore.write_text((folder / "broker.pk8").read_text() + (folder / "broker.pem").read_text())
    return folder / "ca.pem", keystore, folder / "broker.pk8"


@dataclass
class SecureBroker:
    cfg: kafka.BrokerConfig
    proc: subprocess.Popen[bytes]
    secure_bootstrap: str
    ca: Path
    other_ca: Path


def start_secure_broker(home: Path) -> SecureBroker:
    """A broker with a SASL_SSL listener (SCRAM users USER/PASSWORD) next to its loopback PLAINTEXT one."""
    ca, keystore, _ = make_ca_and_cert(home / "tls", "stoker-test")
    other_ca, _, _ = make_ca_and_cert(home / "other-tls", "someone-else")
    plain, controller, secure = free_ports(3)
    jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    listeners = f"PLAINTEXT://127.0.0.1:{plain},SECURE://127.0.0.1:{secure},CONTROLLER://127.0.0.1:{controller}"
    cfg = kafka.BrokerConfig(
        home=home / "broker",
        port=plain,
        controller_port=controller,
        libs_dir=kafka.fetch_artifacts(home / "broker", REPO_ROOT, shared_libs_dir()),
        extra_properties=(
            ("listeners", listeners),
            ("advertised.listeners", f"PLAINTEXT://127.0.0.1:{plain},SECURE://127.0.0.1:{secure}"),
            ("listener.security.protocol.map", "PLAINTEXT:PLAINTEXT,SECURE:SASL_SSL,CONTROLLER:PLAINTEXT"),
            ("sasl.enabled.mechanisms", "SCRAM-SHA-512,SCRAM-SHA-256"),
            ("listener.name.secure.scram-sha-512.sasl.jaas.config", jaas),
            ("listener.name.secure.scram-sha-256.sasl.jaas.config", jaas),
            ("ssl.keystore.type", "PEM"),
            ("ssl.keystore.location", str(keystore)),
            ("ssl.truststore.type", "PEM"),
            ("ssl.truststore.location", str(ca)),
        ),
        scram_users=(
            f"SCRAM-SHA-512=[name={USER},password={PASSWORD}]",
            f"SCRAM-SHA-256=[name={USER},password={PASSWORD}]",
        ),
    )
    proc = kafka.launch(cfg, REPO_ROOT, timeout_s=90)
    return SecureBroker(cfg, proc, f"127.0.0.1:{secure}", ca, other_ca)


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    running = start_secure_broker(tmp_path_factory.mktemp("secure-broker"))
    try:
        yield running
    finally:
        kafka.stop_broker(running.proc, timeout_s=30)


def security(broker: SecureBroker, **changes: str) -> KafkaSecurity:
    env = {
        "STOKER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "STOKER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "STOKER_KAFKA_SASL_USERNAME": USER,
        "STOKER_KAFKA_SASL_PASSWORD": PASSWORD,
        "STOKER_KAFKA_SSL_CAFILE": str(broker.ca),
        **changes,
    }
    return KafkaSecurity.from_env(env)


async def round_trip(bootstrap: str, sec: KafkaSecurity) -> bytes:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topic = f"sec-{uuid.uuid4().hex[:8]}"
    # ensure_topics takes the process's settings; pass them explicitly through the admin client here.
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_options(sec), request_timeout_ms=10_000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **client_options(sec), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"over SASL_SSL")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, **client_options(sec), auto_offset_reset="earliest")
    await consumer.start()
    try:
        rec = await asyncio.wait_for(consumer.getone(), 20)
    finally:
        await consumer.stop()
    return rec.value  # type: ignore[no-any-return]


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256"])
def test_round_trip_over_sasl_ssl(secure_broker: SecureBroker, mechanism: str) -> None:
    sec = security(secure_broker, STOKER_KAFKA_SASL_MECHANISM=mechanism)
    assert asyncio.run(round_trip(secure_broker.secure_bootstrap, sec)) == b"over SASL_SSL"


def test_the_platform_client_and_broker_factory_over_sasl_ssl(
    secure_broker: SecureBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """StokerClient and make_broker (what every service is built on) publish and consume over SASL_SSL."""
    from services.common.broker import dead_letter_for, make_broker
    from services.common.client import StokerClient

    pw_file = tmp_path / "password"
    pw_file.write_text(PASSWORD + "\n")  # a mounted Secret's trailing newline is not part of the password
    env = {
        "STOKER_HOME": str(tmp_path / "home"),
        "STOKER_BOOTSTRAP": secure_broker.secure_bootstrap,
        "STOKER_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:8]}.",
        "STOKER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "STOKER_KAFKA_SASL_USERNAME": USER,
        "STOKER_KAFKA_SASL_PASSWORD_FILE": str(pw_file),
        "STOKER_KAFKA_SSL_CAFILE": str(secure_broker.ca),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = CommonSettings.from_env(env)
    topics = Topics(settings.topic_prefix)

    async def go() -> str:
        await ensure_topics(settings.bootstrap, topics.catalogue(invocation_partitions=1))
        got: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        broker = make_broker(settings, "sectest")

        @broker.subscriber(topics.dlq, group_id="sectest", auto_offset_reset="earliest")
        async def on_letter(body: object) -> None:
            if not got.done():
                got.set_result(type(body).__name__)

        await broker.start()
        try:
            async with StokerClient(settings) as client:
                letter = dead_letter_for(
                    topic="t", partition=0, offset=0, key=None, value=b"v", reason="test", consumer="sectest"
                )
                await client._producer.send_and_wait(topics.dlq, codec.encode(letter))
            return await asyncio.wait_for(got, 30)
        finally:
            await broker.stop()

    assert asyncio.run(go()) == "DeadLettered"


def fails_fast(bootstrap: str, sec: KafkaSecurity, caplog: pytest.LogCaptureFixture) -> tuple[float, str]:
    """Seconds until the client gave up, and what it said: the exception and aiokafka's logged cause (the line a
    service's log shows; aiokafka's exception itself only says it could not bootstrap)."""
    from aiokafka import AIOKafkaProducer

    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **client_options(sec), request_timeout_ms=10_000)
        try:
            await asyncio.wait_for(producer.start(), 30)
        finally:
            await producer.stop()

    start = time.monotonic()
    with pytest.raises(Exception) as info:  # noqa: B017 - the type is aiokafka's; the message is asserted on
        asyncio.run(go())
    logged = " | ".join(r.getMessage() for r in caplog.records if r.name.startswith("aiokafka"))
    return time.monotonic() - start, f"{type(info.value).__name__}: {info.value} | {logged}"


def test_a_wrong_password_fails_fast_and_says_so(secure_broker: SecureBroker, caplog: pytest.LogCaptureFixture) -> None:
    sec = security(secure_broker, STOKER_KAFKA_SASL_PASSWORD="no")
    took, message = fails_fast(secure_broker.secure_bootstrap, sec, caplog)
    assert took < 15, f"took {took:.1f}s: {message}"
    assert "Unable to bootstrap" in message and "invalid credentials" in message, message


def test_an_untrusted_certificate_fails_fast_and_says_so(
    secure_broker: SecureBroker, caplog: pytest.LogCaptureFixture
) -> None:
    sec = security(secure_broker, STOKER_KAFKA_SSL_CAFILE=str(secure_broker.other_ca))
    took, message = fails_fast(secure_broker.secure_bootstrap, sec, caplog)
    assert took < 15, f"took {took:.1f}s: {message}"
    assert "Unable to bootstrap" in message and "CERTIFICATE_VERIFY_FAILED" in message, message
