"""A poison message on the events topic."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tests.faults.support import (
    FaultInfra,
    Publisher,
    ingest_env,
    start_ingest,
    track_events,
    wait_for_view,
)

pytestmark = pytest.mark.integration

POISON = [
    b"\x00\xff not json at all \xfe",
    # Valid JSON, but no event: the envelope must refuse it just the same.
    b'{"id": "x", "type": "no.such.type", "account_id": "acct-0"}',
]


async def test_poison_goes_to_dead_letter_and_consumer_goes_on(
    fault_infra: FaultInfra, fault_db: str, tmp_path: Path
) -> None:
    """Invariant: each undecodable record on the events topic lands on the dead-letter topic
    exactly once, byte for byte, with a reason header naming the failure and the group that
    gave up; the valid events published before and after it on the same partition (same key)
    are all projected exactly once (ledger rows and user/account counts)."""
    prefix = f"x{uuid.uuid4().hex[:8]}."
    env = ingest_env(fault_infra, fault_db, prefix, tmp_path / "data")
    proc = await start_ingest(env, tmp_path, "ingest")
    publisher = Publisher(proc.url, batch=100)
    producer = AIOKafkaProducer(bootstrap_servers=fault_infra.kafka_bootstrap)
    await producer.start()
    try:
        await publisher.publish(300)
        for raw in POISON:
            # Keyed like the valid events, so it sits in the middle of a live partition.
            await producer.send_and_wait(f"{prefix}events", raw, key=b"acct-0")
        await publisher.send_events(track_events(300))
        final = await wait_for_view(fault_db, 600)
        dead = await _read_all(fault_infra.kafka_bootstrap, f"{prefix}dead-letter", len(POISON))
    finally:
        await producer.stop()
        proc.stop()

    assert not publisher.unexpected, publisher.unexpected
    assert len(publisher.accepted) == 600
    assert (final.processed, final.user_events, final.account_events) == (600, 600, 600)
    assert sorted(value for value, _ in dead) == sorted(POISON)
    for _, headers in dead:
        assert headers["nbv-dlq-group"] == f"{prefix}projector".encode()
        assert b"undecodable event" in headers["nbv-dlq-reason"], headers


async def _read_all(
    bootstrap: str, topic: str, at_least: int, timeout: float = 30
) -> list[tuple[bytes, dict[str, bytes]]]:
    """Everything on ``topic``; waits for ``at_least`` records, then a little longer so a
    duplicate would show."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    out: list[tuple[bytes, dict[str, bytes]]] = []
    try:
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for messages in batches.values():
                out += [(m.value or b"", dict(m.headers or ())) for m in messages]
            if len(out) >= at_least:
                settle_until = settle_until or time.monotonic() + 2
                if time.monotonic() > settle_until:
                    break
            await asyncio.sleep(0)
    finally:
        await consumer.stop()
    return out
