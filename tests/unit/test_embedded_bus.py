import asyncio
from collections.abc import Sequence
from pathlib import Path

from shared.bus import Message, Record
from shared.bus.embedded import EmbeddedBus
from shared.worker import ConsumerWorker, PoisonRecord


async def _drain(consumer, want: int) -> list[Record]:
    got: list[Record] = []
    for _ in range(50):
        got += await consumer.fetch(100, 50)
        if len(got) >= want:
            break
    return got


async def test_log_is_ordered_durable_and_resumes_from_the_commit(tmp_path: Path) -> None:
    path = tmp_path / "bus.sqlite"
    bus = EmbeddedBus(path)
    await bus.start()
    await bus.publish("t", [Message(f"k{i % 3}", f"m{i}".encode()) for i in range(10)])
    consumer = bus.consumer(["t"], "g")
    await consumer.start()
    first = await _drain(consumer, 10)
    assert [r.value for r in first] == [f"m{i}".encode() for i in range(10)]
    assert [r.offset for r in first] == list(range(10))
    await consumer.commit()
    await bus.publish("t", [Message("k", b"after-commit")])
    await _drain(consumer, 1)  # fetched, but not committed: must come again after a restart
    await bus.stop()

    reopened = EmbeddedBus(path)
    await reopened.start()
    again = reopened.consumer(["t"], "g")
    await again.start()
    assert [r.value for r in await _drain(again, 1)] == [b"after-commit"]
    other_group = reopened.consumer(["t"], "other")
    await other_group.start()
    assert len(await _drain(other_group, 11)) == 11
    assert await again.lag() == {("t", 0): 1}
    await reopened.stop()


async def test_a_waiting_consumer_wakes_up_on_publish(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus.sqlite")
    await bus.start()
    consumer = bus.consumer(["t"], "g")
    await consumer.start()
    waiting = asyncio.create_task(consumer.fetch(10, 5_000))
    await asyncio.sleep(0.05)
    await bus.publish("t", [Message("k", b"hello")])
    records = await asyncio.wait_for(waiting, 1)
    assert [r.value for r in records] == [b"hello"]
    await bus.stop()


async def test_worker_dead_letters_the_poison_record_and_goes_on(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus.sqlite")
    await bus.start()
    handled: list[bytes] = []
    attempts = {"transient": 0}

    async def handler(records: Sequence[Record]) -> None:
        if any(r.value == b"poison" for r in records):
            raise PoisonRecord("cannot parse")
        if any(r.value == b"flaky" for r in records) and attempts["transient"] < 2:
            attempts["transient"] += 1
            raise ConnectionError("store down")
        handled.extend(r.value for r in records)

    worker = ConsumerWorker(
        bus=bus, topics=["in"], group="g", handler=handler, dead_letter_topic="dlq", poll_ms=20
    )
    await worker.start()
    await bus.publish("in", [Message("k", v) for v in (b"a", b"poison", b"flaky", b"b")])
    for _ in range(200):
        if len(handled) == 3:
            break
        await asyncio.sleep(0.02)
    await worker.stop()
    assert handled == [b"a", b"flaky", b"b"]
    assert attempts["transient"] == 2
    dlq = bus.consumer(["dlq"], "inspect")
    await dlq.start()
    [dead] = await dlq.fetch(10, 100)
    headers = dict(dead.headers)
    assert dead.value == b"poison"
    assert b"cannot parse" in headers["nbv-dlq-reason"]
    # Everything was committed: a restarted group has nothing left to read.
    resumed = bus.consumer(["in"], "g")
    await resumed.start()
    assert await resumed.fetch(10, 50) == []
    await bus.stop()
