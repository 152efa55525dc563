"""Thin handlers: work commands for this node -> NodeAgent calls."""

from __future__ import annotations

from faststream.kafka import KafkaBroker
from faststream.middlewares import AckPolicy

from events import Clamp, ConfigureNode, EnsurePool, Execute, Recycle, Specialize
from services.agent.node import NodeAgent


def register(broker: KafkaBroker, agent: NodeAgent) -> None:
    """Subscribe ``agent`` to its node's work topic."""
    topic = agent.topics.work(agent.settings.node)

    # The group keeps this node's position across restarts; commands addressed to an older
    # incarnation are skipped (the dispatcher re-routes them), so nothing runs twice.
    # The offset is committed once a command is handed to the agent (ACK after the handler).
    @broker.subscriber(
        topic,
        group_id=f"stoker-agent-{agent.settings.node}",
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.ACK,
        fetch_max_wait_ms=100,
    )
    async def on_work(cmd: Execute | Specialize | EnsurePool | Recycle | Clamp | ConfigureNode) -> None:
        if not agent.is_mine(cmd.incarnation):
            return
        if isinstance(cmd, Execute):
            agent.accept_execute(cmd)
        elif isinstance(cmd, EnsurePool):
            agent.ensure_pool(cmd)
        elif isinstance(cmd, Recycle):
            await agent.recycle(cmd)
        elif isinstance(cmd, Clamp):
            await agent.clamp(cmd)
        elif isinstance(cmd, ConfigureNode):
            await agent.configure(cmd)
        else:
            agent.specialize(cmd)
