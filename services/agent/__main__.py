"""``python -m services.agent``: run one node agent (``STOKER_NODE_NAME`` names the node)."""

import asyncio

from services.agent import namespaces

if __name__ == "__main__":
    # First, while this process has one thread: the mounts of the sandbox stay the agent's own.
    namespaces.private_mount_namespace()
    from services.agent.app import run
    from services.agent.settings import AgentSettings

    asyncio.run(run(AgentSettings.from_env()))
