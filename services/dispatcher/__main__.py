"""``python -m services.dispatcher``."""

import asyncio

from services.dispatcher.app import run
from services.dispatcher.settings import DispatcherSettings

if __name__ == "__main__":
    asyncio.run(run(DispatcherSettings.from_env()))
