"""kill -9 the ingest process (HTTP + projector) while a backlog is being projected."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from tests.faults.support import (
    FaultInfra,
    Publisher,
    ingest_env,
    kill9,
    start_ingest,
    view_counts,
    wait_for_view,
)

pytestmark = pytest.mark.integration

TOTAL = 6_000


async def test_kill9_mid_stream_every_accepted_event_counted_once(
    fault_infra: FaultInfra, fault_db: str, tmp_path: Path
) -> None:
    """Invariant: after a SIGKILL while the projector has a backlog and a restart, every event
    the API accepted (202) is in the view exactly once: the idempotency ledger holds exactly
    the accepted ids, and the users' and accounts' event counts each sum to that number
    (an event applied twice, e.g. redelivered after the uncommitted batch, would add to them;
    a lost one would subtract)."""
    env = ingest_env(fault_infra, fault_db, f"k{uuid.uuid4().hex[:8]}.", tmp_path / "data")
    # Small consumer batches: many commits in flight, so the kill lands between a batch's
    # effects and its commit far more often than not.
    env["NBV_CONSUMER_BATCH_SIZE"] = "50"
    proc = await start_ingest(env, tmp_path, "ingest-1")
    publisher = Publisher(proc.url, batch=200)
    first = asyncio.create_task(publisher.publish(TOTAL // 2))

    # Kill once the projector is part-way: something projected, a backlog still waiting.
    while True:
        counts = await view_counts(fault_db)
        if counts.processed >= 300 or first.done():
            break
        await asyncio.sleep(0.05)
    kill9(proc)
    at_kill = await view_counts(fault_db)
    accepted_at_kill = len(publisher.accepted)
    assert at_kill.processed < accepted_at_kill, "kill came after the backlog drained"

    # The publisher rides through the outage, retrying the same ids until the new process
    # answers.
    proc = await start_ingest(env, tmp_path, "ingest-2")
    publisher.url = proc.url
    await first
    await publisher.publish(TOTAL - TOTAL // 2)
    try:
        final = await wait_for_view(fault_db, len(publisher.accepted))
    finally:
        proc.stop()

    assert not publisher.unexpected, publisher.unexpected
    assert len(publisher.accepted) == TOTAL
    assert final.processed == TOTAL, (final, publisher.statuses)
    assert final.user_events == TOTAL, final
    assert final.account_events == TOTAL, final
