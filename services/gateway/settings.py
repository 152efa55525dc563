"""Gateway settings."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.common.settings import CommonSettings, env_float, env_int, env_str


@dataclass(frozen=True)
class GatewaySettings:
    common: CommonSettings
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 6 * 1024 * 1024
    publish_timeout_s: float = 10.0
    """How long a write to the broker may take before the request is answered 503."""
    sync_queue_s: float = 30.0
    """Extra time a synchronous call may wait for capacity on top of the function's timeout."""
    gateway_id: str = "gateway-8080"
    console_url: str = "http://127.0.0.1:8081/console"
    """Where ``/console`` sends a browser: the console service."""
    token_rate_per_s: float = 100.0
    """Requests a second a token may make unless its own record says otherwise (``STOKER_TOKEN_RATE_PER_S``)."""
    auth_failures_per_s: float = 5.0
    """Failed token checks a second one client address may make before it is answered 429."""
    webhook_secret: str = ""
    """Shared secret of git webhooks (``STOKER_WEBHOOK_SECRET``); per-repository ones override it."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewaySettings:
        env = os.environ if env is None else env
        port = env_int(env, "STOKER_HTTP_PORT", 8080)
        return cls(
            common=CommonSettings.from_env(env),
            host=env_str(env, "STOKER_HTTP_HOST", "127.0.0.1"),
            port=port,
            max_body_bytes=env_int(env, "STOKER_MAX_BODY_BYTES", 6 * 1024 * 1024),
            publish_timeout_s=env_float(env, "STOKER_PUBLISH_TIMEOUT_S", 10.0),
            sync_queue_s=env_float(env, "STOKER_SYNC_QUEUE_S", 30.0),
            gateway_id=env_str(env, "STOKER_GATEWAY_ID", f"gateway-{port}"),
            console_url=env_str(env, "STOKER_CONSOLE_URL", "http://127.0.0.1:8081/console"),
            token_rate_per_s=env_float(env, "STOKER_TOKEN_RATE_PER_S", 100.0),
            auth_failures_per_s=env_float(env, "STOKER_AUTH_FAILURES_PER_S", 5.0),
            webhook_secret=env_str(env, "STOKER_WEBHOOK_SECRET", ""),
        )
