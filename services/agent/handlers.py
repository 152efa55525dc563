"""Thin handlers: work commands for this node -> NodeAgent calls."""

from __future__ import annotations

from faststream.kafka import KafkaBroker

from events import Clamp, ConfigureNode, EnsurePool, Execute, Recycle, Specialize
from events.base import Record
from services.agent.node import NodeAgent
from services.agent.work import WorkConsumer
from services.common.views import dead_letters_to

WORK_COMMANDS = (Execute, Specialize, EnsurePool, Recycle, Clamp, ConfigureNode)


def work_consumer(broker: KafkaBroker, agent: NodeAgent) -> WorkConsumer:
    """The consumer of ``agent``'s work topic (start it, run it as a background loop, stop it)."""

    async def on_work(cmd: Record) -> None:
        assert isinstance(cmd, WORK_COMMANDS)
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

    # The group keeps this node's position across restarts; commands addressed to an older
    # incarnation are skipped (the dispatcher re-routes them), so nothing runs twice. Offsets are
    # committed in the background once their commands were handed to the agent.
    return WorkConsumer(
        agent.settings.common.bootstrap,
        agent.topics.work(agent.settings.node),
        f"stoker-agent-{agent.settings.node}",
        on_work,
        dead_letters_to(broker, agent.topics.dlq),
        WORK_COMMANDS,
        consumer=f"agent-{agent.settings.node}",
    )
