"""``python -m services.builder``."""

import asyncio

from services.builder.app import run
from services.builder.settings import BuilderSettings

if __name__ == "__main__":
    asyncio.run(run(BuilderSettings.from_env()))
