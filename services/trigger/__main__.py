"""``python -m services.trigger``."""

import asyncio

from services.trigger.app import run
from services.trigger.settings import TriggerSettings

if __name__ == "__main__":
    asyncio.run(run(TriggerSettings.from_env()))
