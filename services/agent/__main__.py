"""``python -m services.agent``: run one node agent (``STOKER_NODE_NAME`` names the node)."""

import asyncio

from services.agent.app import run
from services.agent.settings import AgentSettings

if __name__ == "__main__":
    asyncio.run(run(AgentSettings.from_env()))
