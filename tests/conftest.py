"""Fixtures: one real Kafka broker per test session, unique topic prefixes per test."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from events import Topics
from services.common.admin import ensure_topics
from services.common.settings import CommonSettings
from tests.helpers import RunningBroker, start_test_broker


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """A real broker for the whole session (started here, stopped at the end)."""
    home = tmp_path_factory.mktemp("broker")
    running = start_test_broker(home)  # raises BrokerError with the broker's log if it cannot start
    try:
        yield running
    finally:
        running.stop(timeout_s=30)


@pytest.fixture
def stoker_settings(kafka_broker: RunningBroker, tmp_path: Path) -> CommonSettings:
    """Settings for one test: its own state folder and topic prefix, all topics created."""
    prefix = f"t{uuid.uuid4().hex[:8]}."
    settings = CommonSettings(home=tmp_path / "home", bootstrap=kafka_broker.bootstrap, topic_prefix=prefix)
    topics = Topics(prefix)
    asyncio.run(ensure_topics(kafka_broker.bootstrap, topics.catalogue(invocation_partitions=2)))
    return settings
