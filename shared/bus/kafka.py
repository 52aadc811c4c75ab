"""The bus on Apache Kafka (aiokafka)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from functools import lru_cache

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.partitioner import murmur2
from aiokafka.producer.message_accumulator import BatchBuilder

from shared import tracing
from shared.bus.base import Bus, Consumer, Message, Record

log = logging.getLogger(__name__)

# What one fetch may bring per partition (aiokafka's default is 1 MiB, ~2,000 events): a poll
# returns only what the fetches brought, so the default capped a batch near 2,000 events per
# assigned partition whatever NBV_CONSUMER_BATCH_SIZE said, and the projector's cost per event
# falls with its batch (a user or account row is written once per batch however many of its
# events the batch holds). Memory: at most this much buffered per assigned partition.
MAX_PARTITION_FETCH_BYTES = 4 * 2**20


_new_tuple = tuple.__new__


class KafkaConsumer(Consumer):
    def __init__(self, bootstrap: str, topics: Sequence[str], group: str, client_id: str) -> None:
        self._topics = list(topics)
        self._consumer = AIOKafkaConsumer(
            *self._topics,
            bootstrap_servers=bootstrap,
            group_id=group,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_interval_ms=300_000,
            session_timeout_ms=30_000,
            heartbeat_interval_ms=3_000,
            retry_backoff_ms=200,
            max_partition_fetch_bytes=MAX_PARTITION_FETCH_BYTES,
        )

    async def start(self) -> None:
        await self._consumer.start()

    async def fetch(self, max_records: int, timeout_ms: int) -> list[Record]:
        batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        records: list[Record] = []
        append = records.append
        for tp, messages in batches.items():
            topic, partition = tp.topic, tp.partition
            for m in messages:
                append(
                    # tuple.__new__ rather than Record(...): the named tuple's __new__ is a
                    # Python function, and a projector batch is tens of thousands of records.
                    _new_tuple(
                        Record,
                        (
                            topic,
                            partition,
                            m.offset,
                            m.key.decode() if m.key else "",
                            m.value or b"",
                            m.timestamp,
                            tuple(m.headers) if m.headers else (),
                        ),
                    )
                )
        return records

    async def commit(self) -> None:
        await self._consumer.commit()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def lag(self) -> dict[tuple[str, int], int]:
        assigned: set[TopicPartition] = self._consumer.assignment()
        if not assigned:
            return {}
        ends = await self._consumer.end_offsets(list(assigned))
        result: dict[tuple[str, int], int] = {}
        for tp in assigned:
            committed = await self._consumer.committed(tp)
            result[(tp.topic, tp.partition)] = max(0, ends[tp] - (committed or 0))
        return result


class KafkaBus(Bus):
    def __init__(
        self,
        bootstrap: str,
        *,
        client_id: str = "nbv",
        partitions: int = 3,
        topics: Sequence[str] = (),
        request_timeout_ms: int = 15_000,
        topic_configs: Mapping[str, Mapping[str, str]] | None = None,
        linger_ms: int = 0,
    ) -> None:
        self._bootstrap = bootstrap
        self._client_id = client_id
        self._partitions = partitions
        self._topics = list(topics)
        # Per topic, set when NBV creates it (e.g. the events topic's retention.ms).
        self._topic_configs = {t: dict(c) for t, c in (topic_configs or {}).items()}
        self._request_timeout_ms = request_timeout_ms
        self._linger_ms = linger_ms
        self._producer: AIOKafkaProducer | None = None
        # The producer a failed publish may have wedged; replaced before the next send.
        self._stale: AIOKafkaProducer | None = None
        self._swap_lock = asyncio.Lock()
        self._retired: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self._ensure_topics()
        self._producer = await self._new_producer()

    async def _new_producer(self) -> AIOKafkaProducer:
        # Idempotent producer with acks=all: a publish that returned is on the broker's log,
        # and the producer's own retries never duplicate a message.
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            client_id=self._client_id,
            acks="all",
            enable_idempotence=True,
            # Every publish awaits its acknowledgement (a decision's answer waits for it), and
            # callers already hand over whole batches (a request's events, a group commit's
            # decisions); while a produce request is in flight the next messages gather
            # anyway. A linger would only add its own length to every publish.
            linger_ms=self._linger_ms,
            # 16 KiB (the default) is ~40 events: a 1,000-event request would take dozens of
            # produce requests, most of the producer's CPU.
            max_batch_size=256 * 1024,
            request_timeout_ms=self._request_timeout_ms,
            retry_backoff_ms=200,
            compression_type=None,
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return producer

    async def _healthy_producer(self) -> AIOKafkaProducer:
        """The producer to send with, replacing one that a failed publish left wedged.

        aiokafka's idempotent producer does not recover from a batch that failed after taking
        a sequence number (e.g. it timed out while the broker was restarting): the broker
        then refuses every later batch to that partition with OutOfOrderSequenceNumber, for
        good. A fresh producer gets a new producer id and starts its sequences clean; the
        failed publish was reported to the caller, who retries it with the same event ids.
        """
        if self._producer is None:
            raise RuntimeError("bus not started")
        if self._stale is not self._producer:
            return self._producer
        async with self._swap_lock:
            if self._stale is self._producer:
                fresh = await self._new_producer()  # raises while the broker is away
                old, self._producer, self._stale = self._producer, fresh, None
                self._retired.add(asyncio.create_task(self._retire(old)))
        return self._producer

    async def _retire(self, producer: AIOKafkaProducer) -> None:
        # In the background: stopping flushes what it still holds, which may wait for timeouts.
        try:
            await asyncio.wait_for(producer.stop(), timeout=self._request_timeout_ms / 1000 + 5)
        except Exception:
            log.warning("retired producer did not stop cleanly", exc_info=True)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._retired.discard(task)

    async def _ensure_topics(self) -> None:
        if not self._topics:
            return
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self._bootstrap,
            client_id=f"{self._client_id}-admin",
            request_timeout_ms=self._request_timeout_ms,
        )
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = [
                NewTopic(
                    name=t,
                    num_partitions=self._partitions,
                    replication_factor=1,
                    topic_configs=self._topic_configs.get(t, {}),
                )
                for t in self._topics
                if t not in existing
            ]
            if missing:
                # Another instance may have created them first.
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics(missing)
                log.info("topics created", extra={"topics": [t.name for t in missing]})
        finally:
            await admin.close()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        if self._retired:
            await asyncio.gather(*self._retired, return_exceptions=True)

    async def publish(self, topic: str, messages: Sequence[Message]) -> None:
        producer = await self._healthy_producer()
        messages = tracing.inject(messages)
        if not messages:
            return
        futures: list[asyncio.Future[object]] = []
        try:
            if len(messages) == 1:
                m = messages[0]
                futures.append(
                    await producer.send(
                        topic, value=m.value, key=m.key.encode(), headers=list(m.headers)
                    )
                )
            else:
                await self._send_batches(producer, topic, messages, futures)
            # One by one rather than gather(): most are done once the first is, where gather()
            # sets a callback on each.
            for future in futures:
                await future
        except (KafkaError, TimeoutError, OSError):
            self._stale = producer
            for future in futures:
                future.add_done_callback(_retrieve)  # the error is raised once, here
            raise

    async def _send_batches(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        messages: Sequence[Message],
        futures: list[asyncio.Future[object]],
    ) -> None:
        """Queue ``messages`` as one record batch per partition (more when one fills up),
        adding each batch's future to ``futures`` as it is queued (so a failure part-way
        leaves the caller every future to collect).

        ``send()`` costs ~14 µs of Python per message (partitioner, accumulator, a future
        each); a 1,000-event request spent more CPU there than anywhere else in the intake.
        The partition is the one ``send()`` would choose (the default partitioner: murmur2 of
        the key, as the Java client), so one key stays on one partition whichever path
        published it. Batches go out in the order queued, and a partition's batches in
        order: one key keeps its order.
        """
        partitions = sorted(await producer.partitions_for(topic))
        count = len(partitions)
        builders: dict[int, BatchBuilder] = {}
        for m in messages:
            key = m.key.encode()
            partition = partitions[_key_hash(key) % count]
            builder = builders.get(partition)
            if builder is None:
                builder = builders[partition] = producer.create_batch()
            headers = list(m.headers)
            if builder.append(timestamp=None, key=key, value=m.value, headers=headers) is None:
                # Full: it goes now, and the message starts the partition's next batch.
                futures.append(await producer.send_batch(builder, topic, partition=partition))
                builder = builders[partition] = producer.create_batch()
                if builder.append(timestamp=None, key=key, value=m.value, headers=headers) is None:
                    # Larger than a whole batch: send() applies the size limits and says why.
                    del builders[partition]
                    futures.append(
                        await producer.send(
                            topic, value=m.value, key=key, headers=headers, partition=partition
                        )
                    )
        for partition, builder in builders.items():
            futures.append(await producer.send_batch(builder, topic, partition=partition))

    def consumer(self, topics: Sequence[str], group: str) -> Consumer:
        return KafkaConsumer(self._bootstrap, topics, group, self._client_id)

    async def ready(self) -> bool:
        if self._producer is None:
            return False
        try:
            await asyncio.wait_for(self._producer.client.fetch_all_metadata(), timeout=3)
        except (KafkaError, TimeoutError, OSError):
            return False
        return True


@lru_cache(maxsize=65_536)
def _key_hash(key: bytes) -> int:
    """The default partitioner's hash of a key (positive murmur2), kept for the hot keys: a
    pure-Python murmur2 per message was a few percent of the intake."""
    return int(murmur2(key)) & 0x7FFFFFFF


def _retrieve(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()
