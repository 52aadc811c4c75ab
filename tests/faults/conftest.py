"""The fault suite's own PostgreSQL and Kafka.

These tests stop, kill and restart the broker and the database, so they never touch the shared
instances other tests use (55432 / 9092): a session fixture starts a private pair on free ports
with ``deploy/local/infra.sh`` and a state dir of its own, and tears it down at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from tests.faults.support import FaultInfra
from tests.harness import free_port

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "deploy" / "local"


@pytest.fixture(scope="session")
def fault_infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultInfra]:
    if shutil.which("java") is None and os.environ.get("NBV_REQUIRE_INFRA") != "1":
        pytest.skip("no Java: the fault suite needs its own Kafka broker")
    state = tmp_path_factory.mktemp("nbv-faults")
    env = {
        **os.environ,
        "NBV_STATE_DIR": str(state),
        "NBV_PG_PORT": str(free_port()),
        "NBV_KAFKA_PORT": str(free_port()),
        "NBV_KAFKA_CONTROLLER_PORT": str(free_port()),
        # A broker that is told to stop during a test should go quickly.
        "NBV_KAFKA_STOP_TIMEOUT": "20",
    }
    infra = FaultInfra(LOCAL, env)
    up = subprocess.run(
        [str(LOCAL / "infra.sh"), "up"], env=env, capture_output=True, text=True, timeout=300
    )
    if up.returncode != 0:
        subprocess.run([str(LOCAL / "infra.sh"), "down"], env=env, timeout=120)
        pytest.fail(f"fault infra did not start:\n{up.stderr[-3000:]}")
    try:
        yield infra
    finally:
        subprocess.run([str(LOCAL / "infra.sh"), "down"], env=env, capture_output=True, timeout=180)


@pytest.fixture
async def fault_db(fault_infra: FaultInfra) -> AsyncIterator[str]:
    """A fresh database on the fault suite's PostgreSQL for one test."""
    name = f"nbv_f_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(fault_infra.admin_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    await admin.dispose()
    yield make_url(fault_infra.admin_url).set(database=name).render_as_string(hide_password=False)
    # The server may have been restarted by the test: a new engine, and best effort.
    admin = create_async_engine(fault_infra.admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.dispose()
