"""``stoker token …``: API tokens for the gateway and the console (made, listed and revoked over Kafka:
the operator's path; the gateway's ``/api/v1/tokens`` does the same with an admin token)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from events import TokenIssued
from services.common import auth, operations
from services.common.client import StokerClient
from services.common.settings import CommonSettings

SCOPES_HELP = "; ".join(f"{scope}: {what}" for scope, what in auth.scope_table().items())
app = typer.Typer(help=f"API tokens. Scopes: {SCOPES_HELP}.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _settings() -> CommonSettings:
    from services.cli.main import settings

    return settings()


def admin_token_path(common: CommonSettings) -> Path:
    return common.home / "admin-token"


async def ensure_admin_token(common: CommonSettings) -> tuple[str, bool]:
    """The first admin token (``$STOKER_HOME/admin-token``, mode 0600): kept while the platform knows it,
    made anew otherwise (a new broker, a revoked token). Returns (token, made now)."""
    path = admin_token_path(common)
    async with StokerClient(common) as client:
        known = await operations.tokens(client)
        if path.is_file():
            token = path.read_text().strip()
            match = auth.TOKEN.match(token)
            record = known.get(match.group(1)) if match else None
            if isinstance(record, TokenIssued) and record.digest == auth.digest_of(token):
                return token, False
        token, _ = await operations.create_token(
            client, ["admin"], name="admin (stoker up)", rate_per_s=0, by="stoker up"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    os.chmod(path, 0o600)
    return token, True


def _seconds(text: str) -> float:
    unit = text[-1:]
    try:
        return float(text[:-1]) * UNITS[unit] if unit in UNITS else float(text)
    except ValueError:
        raise typer.BadParameter(f"a duration is a number with s, m, h or d, got {text!r}") from None


@app.command("create")
def create(
    scope: Annotated[list[str], typer.Option("--scope", help="invoke:GLOB, deploy:GLOB, read or admin (repeat).")],
    name: Annotated[str, typer.Option(help="What the token is for.")] = "",
    expires_in: Annotated[Optional[str], typer.Option(help="Lifetime, e.g. 30d, 12h (default: none).")] = None,
    rate: Annotated[
        Optional[float], typer.Option(help="Requests a second (0: no limit; default: the gateway's).", min=0)
    ] = None,
) -> None:
    """Make a token; it is printed once and stored only as a hash."""
    common = _settings()
    expires = _seconds(expires_in) if expires_in else None

    async def go() -> tuple[str, TokenIssued]:
        async with StokerClient(common) as client:
            return await operations.create_token(
                client, scope, name=name, expires_in_s=expires, rate_per_s=rate, by="stoker token create"
            )

    try:
        token, record = asyncio.run(go())
    except operations.Refused as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    err.print(f"token {record.id} ({', '.join(record.scopes)}); it is shown this once:")
    print(token)


@app.command("list")
def list_tokens() -> None:
    """Every token: id, name, scopes, state (never a secret)."""
    common = _settings()

    async def go() -> list[dict[str, object]]:
        async with StokerClient(common) as client:
            rows = await operations.tokens(client)
            return [operations.token_row(rows[k]) for k in sorted(rows)]

    table = Table("id", "name", "scopes", "state", "rate/s", "expires", "by")
    for row in asyncio.run(go()):
        expires = row.get("expires_ms")
        table.add_row(
            str(row["id"]),
            str(row.get("name") or ""),
            ", ".join(row.get("scopes") or []),  # type: ignore[arg-type]
            str(row["state"]),
            "-" if row.get("rate_per_s") is None else f"{row['rate_per_s']:g}",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(expires / 1000)) if isinstance(expires, int) else "-",
            str(row.get("by") or ""),
        )
    console.print(table)


@app.command("revoke")
def revoke(ident: str) -> None:
    """Revoke a token now: every gateway refuses it from the moment it reads the revocation."""
    common = _settings()

    async def go() -> None:
        async with StokerClient(common) as client:
            await operations.revoke_token(client, ident, by="stoker token revoke")

    try:
        asyncio.run(go())
    except operations.Refused as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(f"token {ident} revoked")
