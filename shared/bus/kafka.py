"""The bus on Apache Kafka (aiokafka)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from shared import tracing
from shared.bus.base import Bus, Consumer, Message, Record

log = logging.getLogger(__name__)


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
        )

    async def start(self) -> None:
        await self._consumer.start()

    async def fetch(self, max_records: int, timeout_ms: int) -> list[Record]:
        batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        records: list[Record] = []
        for tp, messages in batches.items():
            for m in messages:
                records.append(
                    Record(
                        topic=tp.topic,
                        partition=tp.partition,
                        offset=m.offset,
                        key=(m.key or b"").decode(),
                        value=m.value or b"",
                        timestamp_ms=m.timestamp,
                        headers=tuple(m.headers or ()),
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
    ) -> None:
        self._bootstrap = bootstrap
        self._client_id = client_id
        self._partitions = partitions
        self._topics = list(topics)
        # Per topic, set when NBV creates it (e.g. the events topic's retention.ms).
        self._topic_configs = {t: dict(c) for t, c in (topic_configs or {}).items()}
        self._request_timeout_ms = request_timeout_ms
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
            linger_ms=5,
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
        futures: list[asyncio.Future[object]] = []
        try:
            futures += [
                await producer.send(
                    topic, value=m.value, key=m.key.encode(), headers=list(m.headers)
                )
                for m in messages
            ]
            # One by one rather than gather(): a batch's futures resolve together, so after
            # the first the rest are done, where gather() sets a callback on each.
            for future in futures:
                await future
        except (KafkaError, TimeoutError, OSError):
            self._stale = producer
            for future in futures:
                future.add_done_callback(_retrieve)  # the error is raised once, here
            raise

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


def _retrieve(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()
