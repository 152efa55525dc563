"""The management actions that the CLI and the console share, over one connected :class:`StokerClient`.

Each checks what it acts on first and raises :class:`Refused` with a message a user can act on; the
CLI prints it, the console answers it as a 4xx.
"""

from __future__ import annotations

import time
from typing import Any

from events import ConfigureNode, PlacementOverride, PrewarmRequested
from services.common.client import StokerClient


class Refused(Exception):
    """The action names something that is not there (``status`` is the HTTP status that says so)."""

    def __init__(self, message: str, status: int = 404) -> None:
        super().__init__(message)
        self.status = status


async def _known_function(client: StokerClient, name: str) -> None:
    if name not in await client.functions():
        raise Refused(f"no function named {name!r}")


async def prewarm(client: StokerClient, name: str, count: int, reason: str) -> None:
    """Ask for ``count`` instances holding the function's active version ahead of demand."""
    await _known_function(client, name)
    await client.send(PrewarmRequested(function=name, count=count, reason=reason), client.topics.prewarm, name)


async def configure_node(client: StokerClient, name: str, **changes: Any) -> None:
    """Change a running node (labels, taints, cordon, drain) through its work topic, as its agent expects."""
    record = (await client.nodes()).get(name)
    if record is None or record.type != "node.heartbeat":
        raise Refused(f"no running node named {name!r}")
    await client.send(ConfigureNode(incarnation=record.incarnation, **changes), client.topics.work(name), name)


async def isolate(client: StokerClient, name: str, seconds: float, reason: str) -> None:
    """Run a function only on isolation nodes for ``seconds``."""
    await _known_function(client, name)
    until = int(time.time() * 1000 + seconds * 1000)
    override = PlacementOverride(function=name, until_ms=until, reason=reason, by="user")
    await client.send(override, client.topics.placement, name)


async def release_isolation(client: StokerClient, name: str) -> None:
    """End a function's isolation now (a tombstone of its placement override)."""
    await _known_function(client, name)
    await client.tombstone(client.topics.placement, name)
