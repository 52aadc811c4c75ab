"""Shared fixtures. Integration tests need the real PostgreSQL and Kafka that
``deploy/local/infra.sh up`` starts; ``scripts/test.sh`` (the README's test command) does that
and exports NBV_TEST_DATABASE_URL and NBV_TEST_KAFKA_BOOTSTRAP.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.settings import BusKind, Settings
from tests.harness import TEST_ADMIN_KEY, delete_topics, fresh_database

REQUIRE_INFRA = os.environ.get("NBV_REQUIRE_INFRA") == "1"


def _need(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        message = f"{name} is not set: run the tests with scripts/test.sh (starts PostgreSQL/Kafka)"
        if REQUIRE_INFRA:
            pytest.fail(message)
        pytest.skip(message)
    return value


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    return _need("NBV_TEST_DATABASE_URL")


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    return _need("NBV_TEST_KAFKA_BOOTSTRAP")


@pytest.fixture
async def pg_url(pg_admin_url: str) -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    async with fresh_database(pg_admin_url) as url:
        yield url


@pytest.fixture
async def topic_prefix() -> AsyncIterator[str]:
    """Topics and consumer groups of their own for each test; its topics are deleted after
    it, as its database is."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    yield prefix
    bootstrap = os.environ.get("NBV_TEST_KAFKA_BOOTSTRAP")
    if bootstrap:
        await delete_topics(bootstrap, prefix)


@pytest.fixture
def embedded_settings(tmp_path: Path) -> Settings:
    return Settings(
        bus=BusKind.EMBEDDED,
        database_url="",  # never the one a developer's shell exported
        data_dir=tmp_path / "data",
        consumer_poll_ms=20,
        exploration_epsilon=0.0,
        admin_key=TEST_ADMIN_KEY,
    )


@pytest.fixture
def kafka_settings(
    pg_url: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> Settings:
    return Settings(
        bus=BusKind.KAFKA,
        database_url=pg_url,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        data_dir=tmp_path / "data",
        consumer_poll_ms=50,
        exploration_epsilon=0.0,
        admin_key=TEST_ADMIN_KEY,
    )
