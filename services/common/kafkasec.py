"""How every Stoker process authenticates to Kafka: one place builds the client's security options.

Read from the environment (``STOKER_KAFKA_*``) by ``CommonSettings.from_env``; every aiokafka client and
faststream broker in ``services/`` and ``loadtest/`` passes ``client_options(...)`` (or ``faststream_security``).
The default is PLAINTEXT, what the embedded broker of ``stoker up`` speaks on loopback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class KafkaSecurityError(ValueError):
    """The security settings are inconsistent or name a file that cannot be read."""


@dataclass(frozen=True)
class KafkaSecurity:
    """The broker's security settings, as a Kafka client needs them."""

    protocol: str = "PLAINTEXT"
    """``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL`` (``STOKER_KAFKA_SECURITY_PROTOCOL``)."""
    sasl_mechanism: str = "SCRAM-SHA-512"
    """``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512``; used by the SASL protocols only."""
    sasl_username: str = ""
    sasl_password: str = ""
    """From ``STOKER_KAFKA_SASL_PASSWORD`` or the file named by ``STOKER_KAFKA_SASL_PASSWORD_FILE``."""
    ssl_cafile: str = ""
    """CA bundle (PEM) the broker's certificate must chain to; empty uses the system's trust store."""
    ssl_certfile: str = ""
    """Client certificate (PEM) for mutual TLS; empty sends none."""
    ssl_keyfile: str = ""
    """The client certificate's private key (PEM)."""
    ssl_check_hostname: bool = True
    """Whether the broker's certificate must name the host dialled (``STOKER_KAFKA_SSL_CHECK_HOSTNAME=0`` to skip)."""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise KafkaSecurityError(
                f"STOKER_KAFKA_SECURITY_PROTOCOL must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"
            )
        if self.uses_sasl:
            if self.sasl_mechanism not in MECHANISMS:
                raise KafkaSecurityError(
                    f"STOKER_KAFKA_SASL_MECHANISM must be one of {', '.join(MECHANISMS)}, got {self.sasl_mechanism!r}"
                )
            if not self.sasl_username or not self.sasl_password:
                raise KafkaSecurityError(
                    f"{self.protocol} needs STOKER_KAFKA_SASL_USERNAME and STOKER_KAFKA_SASL_PASSWORD "
                    "(or STOKER_KAFKA_SASL_PASSWORD_FILE)"
                )
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise KafkaSecurityError("STOKER_KAFKA_SSL_CERTFILE and STOKER_KAFKA_SSL_KEYFILE go together")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def uses_ssl(self) -> bool:
        return self.protocol.endswith("SSL")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KafkaSecurity:
        env = os.environ if env is None else env

        def get(name: str, default: str = "") -> str:
            return (env.get(name) or default).strip()

        password = env.get("STOKER_KAFKA_SASL_PASSWORD") or ""
        password_file = get("STOKER_KAFKA_SASL_PASSWORD_FILE")
        if password_file:
            try:
                # A mounted Secret ends in a newline more often than not; a password never does.
                password = Path(password_file).read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise KafkaSecurityError(f"STOKER_KAFKA_SASL_PASSWORD_FILE {password_file}: {exc.strerror}") from exc
        username_file = get("STOKER_KAFKA_SASL_USERNAME_FILE")
        username = get("STOKER_KAFKA_SASL_USERNAME")
        if username_file:
            try:
                username = Path(username_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise KafkaSecurityError(f"STOKER_KAFKA_SASL_USERNAME_FILE {username_file}: {exc.strerror}") from exc
        return cls(
            protocol=get("STOKER_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT").upper(),
            sasl_mechanism=get("STOKER_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512").upper(),
            sasl_username=username,
            sasl_password=password,
            ssl_cafile=get("STOKER_KAFKA_SSL_CAFILE"),
            ssl_certfile=get("STOKER_KAFKA_SSL_CERTFILE"),
            ssl_keyfile=get("STOKER_KAFKA_SSL_KEYFILE"),
            ssl_check_hostname=get("STOKER_KAFKA_SSL_CHECK_HOSTNAME", "1").lower() not in ("0", "false", "no"),
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of the SSL protocols (``None`` for the others); one per settings, shared."""
        return _ssl_context(self) if self.uses_ssl else None


@lru_cache(maxsize=8)
def _ssl_context(sec: KafkaSecurity) -> ssl.SSLContext:
    from aiokafka.helpers import create_ssl_context

    for name, path in (("CAFILE", sec.ssl_cafile), ("CERTFILE", sec.ssl_certfile), ("KEYFILE", sec.ssl_keyfile)):
        if path and not Path(path).is_file():
            raise KafkaSecurityError(f"STOKER_KAFKA_SSL_{name} {path} is not a readable file")
    try:
        ctx = create_ssl_context(
            cafile=sec.ssl_cafile or None, certfile=sec.ssl_certfile or None, keyfile=sec.ssl_keyfile or None
        )
    except ssl.SSLError as exc:
        raise KafkaSecurityError(f"cannot load the Kafka TLS files: {exc}") from exc
    ctx.check_hostname = sec.ssl_check_hostname
    return ctx


def current() -> KafkaSecurity:
    """The process's settings (from ``os.environ``), for the call sites that get a bare bootstrap string."""
    return _from_environ(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("STOKER_KAFKA_"))))


@lru_cache(maxsize=4)
def _from_environ(items: tuple[tuple[str, str], ...]) -> KafkaSecurity:
    return KafkaSecurity.from_env(dict(items))


def client_options(sec: KafkaSecurity | None = None) -> dict[str, Any]:
    """The keyword arguments of ``AIOKafkaConsumer``/``AIOKafkaProducer``/``AIOKafkaAdminClient`` for ``sec``
    (the process's settings when ``None``)."""
    sec = current() if sec is None else sec
    opts: dict[str, Any] = {"security_protocol": sec.protocol}
    if sec.uses_ssl:
        opts["ssl_context"] = sec.ssl_context()
    if sec.uses_sasl:
        opts.update(
            sasl_mechanism=sec.sasl_mechanism,
            sasl_plain_username=sec.sasl_username,
            sasl_plain_password=sec.sasl_password,
        )
    return opts


def faststream_security(sec: KafkaSecurity | None = None) -> Any:
    """The ``security=`` object of faststream's ``KafkaBroker`` for ``sec`` (``None`` for PLAINTEXT)."""
    from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

    sec = current() if sec is None else sec
    if sec.protocol == "PLAINTEXT":
        return None
    if not sec.uses_sasl:
        return BaseSecurity(ssl_context=sec.ssl_context(), use_ssl=True)
    kind = {"PLAIN": SASLPlaintext, "SCRAM-SHA-256": SASLScram256, "SCRAM-SHA-512": SASLScram512}[sec.sasl_mechanism]
    return kind(sec.sasl_username, sec.sasl_password, ssl_context=sec.ssl_context(), use_ssl=sec.uses_ssl)


class KafkaUnreachable(ConnectionError):
    """A client could not connect; the message carries aiokafka's own reason (bad password, untrusted
    certificate), which aiokafka logs but leaves out of the exception it raises."""


class _LastError(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.asynccontextmanager
async def explained(bootstrap: str) -> AsyncIterator[None]:
    """Around a client's ``start()``: a connection failure becomes :class:`KafkaUnreachable` saying why."""
    from aiokafka.errors import KafkaError

    seen = _LastError()
    logger = logging.getLogger("aiokafka")
    logger.addHandler(seen)
    try:
        yield
    except KafkaError as exc:
        reasons = [m for m in seen.messages if "Unable" not in m] or seen.messages
        why = reasons[-1] if reasons else str(exc)
        raise KafkaUnreachable(f"cannot connect to Kafka at {bootstrap} ({current().protocol}): {why}") from exc
    finally:
        logger.removeHandler(seen)
