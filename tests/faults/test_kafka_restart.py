"""Restart the Kafka broker while events stream in."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from tests.faults.support import (
    FaultInfra,
    Publisher,
    assert_every_accepted_event_once,
    ingest_env,
    start_ingest,
    wait_for_view,
)
from tests.harness import eventually

pytestmark = pytest.mark.integration


async def test_broker_restart_during_ingest_loses_nothing(
    fault_infra: FaultInfra, fault_db: str, tmp_path: Path
) -> None:
    """Invariant: a broker restart during steady ingest loses no accepted event and duplicates
    none: the API answers 202 or 503 (never a 5xx that hides a loss, never a 4xx), the client
    retries 503s with the same ids, and once the broker is back the consumer resumes and the
    view holds exactly the accepted events — ledger rows, user and account event counts all
    equal to the number of ids answered 202, including those accepted after the restart."""
    env = ingest_env(fault_infra, fault_db, f"b{uuid.uuid4().hex[:8]}.", tmp_path / "data")
    proc = await start_ingest(env, tmp_path, "ingest")
    publisher = Publisher(proc.url, batch=50, pause_s=0.02)
    steady = asyncio.create_task(publisher.run_until_stopped())
    try:
        await eventually(publisher.accepted_count, lambda n: n >= 1_000, what="steady ingest")
        await asyncio.to_thread(fault_infra.kafka, "stop")
        await asyncio.sleep(2)
        await asyncio.to_thread(fault_infra.kafka, "start")
        before = len(publisher.accepted)
        # Resumed: the producer publishes again after the restart ...
        await eventually(
            publisher.accepted_count,
            lambda n: n >= before + 1_000,
            timeout=60,
            what="resumed",
        )
        publisher.stop.set()
        await steady
        # ... and the consumer projects everything, before and after.
        final = await wait_for_view(fault_db, len(publisher.accepted), timeout=90)
    finally:
        publisher.stop.set()
        steady.cancel()
        proc.stop()

    assert_every_accepted_event_once(final, publisher)
