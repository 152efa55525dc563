"""The whole platform on a Kafka that requires SASL_SSL: `stoker up --bootstrap` with STOKER_KAFKA_* set, a
function invoked over HTTP and its result back. Certificates and SCRAM users are made by the test."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli import broker as kafka
from tests.e2e.conftest import STOKER, Platform, processes_under, start_platform
from tests.integration.test_kafka_security import PASSWORD, USER, SecureBroker, start_secure_broker


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Platform, SecureBroker]]:
    root = tmp_path_factory.mktemp("secured")
    broker = start_secure_broker(root / "kafka")
    secret = root / "secret"
    secret.mkdir()
    (secret / "password").write_text(PASSWORD + "\n")
    home = root / "home"
    try:
        env = {
            "STOKER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "STOKER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "STOKER_KAFKA_SASL_USERNAME": USER,
            "STOKER_KAFKA_SASL_PASSWORD_FILE": str(secret / "password"),
            "STOKER_KAFKA_SSL_CAFILE": str(broker.ca),
            "STOKER_BOOTSTRAP": broker.secure_bootstrap,
        }
        platform, up = start_platform(home, "--bootstrap", broker.secure_bootstrap, env_extra=env)
        platform.up_output = up  # type: ignore[attr-defined]
        try:
            yield platform, broker
        finally:
            platform.stoker("down", check=False)
            deadline = time.monotonic() + 10
            while processes_under(home) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not processes_under(home), f"processes left after `stoker down`: {processes_under(home)}"
    finally:
        kafka.stop_broker(broker.proc, timeout_s=30)


def test_the_platform_runs_and_invokes_over_sasl_ssl(secured: tuple[Platform, SecureBroker]) -> None:
    platform, broker = secured
    out = platform.up_output  # type: ignore[attr-defined]
    # stoker up deployed and invoked the example through the secured broker.
    assert "Hello, Stoker!" in out and '"status": "ok"' in out, out
    assert broker.secure_bootstrap in out.replace("\n", "")
    with platform.client() as http:
        answer = http.post("/fn/hello", json={"name": "TLS"})
    assert answer.status_code == 200, answer.text
    assert "TLS" in answer.text, answer.text


def established_to(port: int) -> int:
    """Established TCP connections (IPv4, any process) whose remote end is 127.0.0.1:``port``."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state = fields[2], fields[3]
        if state == "01" and remote == f"0100007F:{port:04X}":
            count += 1
    return count


def test_the_services_talk_only_to_the_sasl_ssl_listener(secured: tuple[Platform, SecureBroker]) -> None:
    platform, broker = secured
    secure_port = int(broker.secure_bootstrap.rpartition(":")[2])
    # The running services hold their connections to the SASL_SSL listener; none to the PLAINTEXT one
    # (the test's readiness probe used it and closed).
    assert established_to(secure_port) >= 10, established_to(secure_port)
    assert established_to(broker.cfg.port) == 0


def test_status_and_the_operator_path_work_over_sasl_ssl(secured: tuple[Platform, SecureBroker]) -> None:
    platform, _ = secured
    status = platform.status()
    assert status["broker"]["reachable"] is True, status["broker"]
    assert {"runtime-0", "runtime-1"} <= set(status["nodes"])
    listed = platform.stoker("--direct", "fn", "list", "--json").stdout
    assert '"hello"' in listed


def test_a_wrong_password_fails_fast_and_says_why(secured: tuple[Platform, SecureBroker], tmp_path: Path) -> None:
    platform, _ = secured
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    env = {**platform.env, "STOKER_KAFKA_SASL_PASSWORD_FILE": str(wrong)}
    started = time.monotonic()
    out = subprocess.run([STOKER, "--direct", "fn", "list"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and time.monotonic() - started < 15
    said = " ".join(out.stderr.split())  # the console wraps long lines
    assert "error: cannot connect to Kafka at" in said and "(SASL_SSL)" in said, out.stderr
    assert "invalid credentials" in said and "Unclosed" not in said, out.stderr
