"""The Kafka bus against the real broker: produce → consume → commit → restart → resume."""

from __future__ import annotations

import asyncio

import pytest

from shared.bus import Message, Record
from shared.bus.kafka import KafkaBus

pytestmark = pytest.mark.integration


async def _read(consumer, want: int, timeout: float = 30) -> list[Record]:
    got: list[Record] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(got) < want and loop.time() < deadline:
        got += await consumer.fetch(500, 200)
    return got


async def test_produce_consume_commit_restart_resume(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}events"
    bus = KafkaBus(kafka_bootstrap, topics=[topic], partitions=3)
    await bus.start()
    assert await bus.ready()
    keys = [f"acct-{i % 7}" for i in range(300)]
    await bus.publish(topic, [Message(k, f"{k}|{i}".encode()) for i, k in enumerate(keys)])

    first = bus.consumer([topic], f"{topic_prefix}g")
    await first.start()
    records = await _read(first, 300)
    assert len(records) == 300
    # One key lives on one partition, in the order it was published.
    by_key: dict[str, list[int]] = {}
    partitions: dict[str, set[int]] = {}
    for r in records:
        by_key.setdefault(r.key, []).append(int(r.value.split(b"|")[1]))
        partitions.setdefault(r.key, set()).add(r.partition)
    assert all(seq == sorted(seq) for seq in by_key.values())
    assert all(len(p) == 1 for p in partitions.values())
    assert len({p for ps in partitions.values() for p in ps}) > 1
    await first.commit()
    await first.stop()

    await bus.publish(topic, [Message("acct-1", b"acct-1|after")])
    resumed = bus.consumer([topic], f"{topic_prefix}g")
    await resumed.start()
    again = await _read(resumed, 1)
    assert [r.value for r in again] == [b"acct-1|after"]
    # Nothing else arrives: the committed offsets held across the restart.
    assert await resumed.fetch(100, 500) == []
    await resumed.stop()
    await bus.stop()


async def test_uncommitted_records_are_redelivered(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}events"
    bus = KafkaBus(kafka_bootstrap, topics=[topic], partitions=1)
    await bus.start()
    await bus.publish(topic, [Message("k", b"one"), Message("k", b"two")])
    crashed = bus.consumer([topic], f"{topic_prefix}g")
    await crashed.start()
    assert len(await _read(crashed, 2)) == 2
    await crashed.stop()  # left without committing: the work was not durable
    retry = bus.consumer([topic], f"{topic_prefix}g")
    await retry.start()
    assert [r.value for r in await _read(retry, 2)] == [b"one", b"two"]
    await retry.stop()
    await bus.stop()


async def test_batched_publish_partitions_as_single_sends_and_keeps_order(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    # A many-message publish builds its own record batches; a one-message publish goes through
    # the producer's send(). Both must put a key on the same partition (the default
    # partitioner's), or one account's events could be consumed out of order.
    topic = f"{topic_prefix}events"
    bus = KafkaBus(kafka_bootstrap, topics=[topic], partitions=4)
    await bus.start()
    keys = [f"acct-{i}" for i in range(40)]
    for key in keys:
        await bus.publish(topic, [Message(key, f"{key}|single".encode())])
    # ~1.1 MB to the 4 partitions: several batches fill up (256 KiB) mid-publish.
    filler = "x" * 1_000
    many = [Message(k, f"{k}|{i}|{filler}".encode()) for i in range(28) for k in keys]
    await bus.publish(topic, many)

    consumer = bus.consumer([topic], f"{topic_prefix}g")
    await consumer.start()
    records = await _read(consumer, len(keys) + len(many))
    await consumer.stop()
    await bus.stop()
    assert len(records) == len(keys) + len(many)
    partitions: dict[str, set[int]] = {}
    sequence: dict[str, list[str]] = {}
    for r in records:
        partitions.setdefault(r.key, set()).add(r.partition)
        sequence.setdefault(r.key, []).append(r.value.decode().split("|")[1])
    assert all(len(p) == 1 for p in partitions.values())
    assert len({p for ps in partitions.values() for p in ps}) == 4
    expected = ["single", *(str(i) for i in range(28))]
    assert all(seq == expected for seq in sequence.values())
    # Headers travel with batched records too (the bus adds the trace id).
    assert all(dict(r.headers).get("nbv-trace-id") for r in records)
