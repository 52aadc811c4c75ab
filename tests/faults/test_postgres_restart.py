"""Restart PostgreSQL under a running ingest service."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest

from tests.faults.support import (
    FaultInfra,
    Publisher,
    assert_every_accepted_event_once,
    ingest_env,
    start_ingest,
    wait_for_view,
)
from tests.harness import auth_headers, eventually

pytestmark = pytest.mark.integration


async def test_postgres_restart_not_ready_then_recovers_nothing_lost(
    fault_infra: FaultInfra, fault_db: str, tmp_path: Path
) -> None:
    """Invariant: while PostgreSQL is down the service says so (/readyz 503 with the store
    check false, reads 503 store_unavailable) yet stays alive (/healthz 200) and keeps
    accepting events into Kafka; after
    the database returns it becomes ready again by itself, without a restart, and the view
    holds every accepted event exactly once (ledger rows and user/account event counts all
    equal the number of ids answered 202)."""
    env = ingest_env(fault_infra, fault_db, f"p{uuid.uuid4().hex[:8]}.", tmp_path / "data")
    proc = await start_ingest(env, tmp_path, "ingest")
    publisher = Publisher(proc.url, batch=50, pause_s=0.02)
    steady = asyncio.create_task(publisher.run_until_stopped())
    try:
        async with httpx.AsyncClient(timeout=10, headers=auth_headers()) as http:

            async def readyz() -> httpx.Response:
                return await http.get(f"{proc.url}/readyz")

            await eventually(publisher.accepted_count, lambda n: n >= 500, what="steady ingest")
            await asyncio.to_thread(fault_infra.postgres, "stop")
            down = await eventually(readyz, lambda r: r.status_code == 503, what="not ready")
            assert down.json()["checks"]["store"] is False, down.json()
            assert (await http.get(f"{proc.url}/healthz")).status_code == 200
            # A read that needs the store is a retryable 503 with a body, not a 500.
            view = await http.get(f"{proc.url}/v1/accounts/acct-0/view")
            assert view.status_code == 503, view.text
            assert view.json()["error"] == "store_unavailable"
            during = len(publisher.accepted)
            await eventually(
                publisher.accepted_count,
                lambda n: n >= during + 200,
                what="ingest during outage",
            )
            await asyncio.to_thread(fault_infra.postgres, "start")
            await eventually(readyz, lambda r: r.status_code == 200, timeout=60, what="ready")
        publisher.stop.set()
        await steady
        final = await wait_for_view(fault_db, len(publisher.accepted), timeout=90)
    finally:
        publisher.stop.set()
        steady.cancel()
        proc.stop()

    assert_every_accepted_event_once(final, publisher)
