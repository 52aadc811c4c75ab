"""The consume → process → commit loop every service's consumers run.

A batch is committed only after its handler returned, i.e. after its effects are durable.
Transient failures (store or broker unreachable) retry the same batch with backoff; any other
failure is narrowed down record by record, and the records that still fail go to the
dead-letter topic with the reason, so one poison message never stops the stream.

Each batch is handled inside the trace context its records carry in their headers (see
shared/tracing.py), so the handler's log lines and the messages it publishes keep the ids.
Consumer lag is reported on a timer of its own: it must keep moving while the loop is stuck
retrying a batch, which is exactly when lag grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Callable, Sequence

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from shared import tracing
from shared.bus.base import Bus, Consumer, Message, Record
from shared.metrics import CONSUMER_LAG, CONSUMER_RECORDS, DEAD_LETTERS

log = logging.getLogger(__name__)

BatchHandler = Callable[[Sequence[Record]], Awaitable[None]]


class PoisonRecord(Exception):
    """A record that can never be processed (e.g. it does not decode)."""


# SQLSTATEs that say "the database cannot serve you right now", not "this record is bad":
# connection exceptions (08), insufficient resources (53, e.g. too many connections),
# operator intervention (57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect
# now: starting up or shutting down), serialization failure and deadlock (40001, 40P01).
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "53", "57P", "40001", "40P01")


def _sqlstate(exc: BaseException) -> str | None:
    for attr in ("sqlstate", "pgcode"):
        value = getattr(exc, attr, None)
        if isinstance(value, str) and value:
            return value
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same batch later can succeed.

    The driver's own exceptions are looked at too, through the chain: asyncpg raises
    ``CannotConnectNowError`` (57P03) unwrapped while PostgreSQL shuts down or starts, and
    treating that as a bad record would dead-letter every event of the batch.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OperationalError | InterfaceError):
            return True
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, ConnectionError | TimeoutError | OSError):
            return True
        state = _sqlstate(current)
        if state is not None and state.startswith(_TRANSIENT_SQLSTATE_PREFIXES):
            return True
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return False


class ConsumerWorker:
    def __init__(
        self,
        *,
        bus: Bus,
        topics: Sequence[str],
        group: str,
        handler: BatchHandler,
        dead_letter_topic: str,
        batch_size: int = 500,
        poll_ms: int = 200,
        max_backoff_s: float = 10.0,
        lag_interval_s: float = 10.0,
    ) -> None:
        self.group = group
        self._bus = bus
        self._topics = list(topics)
        self._handler = handler
        self._dlq = dead_letter_topic
        self._batch_size = batch_size
        self._poll_ms = poll_ms
        self._max_backoff_s = max_backoff_s
        self._lag_interval_s = lag_interval_s
        self._lag_series: set[tuple[str, int]] = set()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lag_task: asyncio.Task[None] | None = None
        self._consumer: Consumer | None = None
        self.started = asyncio.Event()

    async def start(self) -> None:
        self._consumer = self._bus.consumer(self._topics, self.group)
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name=f"consumer:{self.group}")
        self._lag_task = asyncio.create_task(self._lag_loop(), name=f"lag:{self.group}")
        self.started.set()

    async def stop(self) -> None:
        """Finish the batch in hand, commit it, and leave the group."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._lag_task is not None:
            # Not awaited to its end: a lag query to an unreachable broker must not hold up
            # the shutdown, and nothing is lost by cutting it short.
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
        if self._consumer is not None:
            await self._consumer.stop()

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        while not self._stopping.is_set():
            try:
                records = await consumer.fetch(self._batch_size, self._poll_ms)
            except Exception:
                log.exception("fetch failed", extra={"group": self.group})
                await self._sleep(1.0)
                continue
            if records:
                if not await self._process(records):
                    return  # stopping while the batch could not be made durable
                await self._commit(consumer)

    async def _commit(self, consumer: Consumer) -> None:
        backoff = 0.2
        while True:
            try:
                await consumer.commit()
                return
            except Exception:
                log.exception("commit failed, retrying", extra={"group": self.group})
                if self._stopping.is_set():
                    return  # the group will redeliver; consumers are idempotent
                await self._sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)

    async def _process(self, records: Sequence[Record]) -> bool:
        with tracing.use(tracing.for_records(records)):
            return await self._process_traced(records)

    async def _process_traced(self, records: Sequence[Record]) -> bool:
        backoff = 0.2
        while True:
            try:
                await self._handler(records)
                CONSUMER_RECORDS.labels(self.group, "ok").inc(len(records))
                log.info(
                    "records handled",
                    extra={
                        "group": self.group,
                        "topic": records[0].topic,
                        "partition": records[0].partition,
                        "offset": records[0].offset,
                        "count": len(records),
                    },
                )
                return True
            except Exception as exc:
                if is_transient(exc):
                    log.warning(
                        "transient failure, retrying batch",
                        extra={"group": self.group, "error": repr(exc), "backoff_s": backoff},
                    )
                    if self._stopping.is_set():
                        return False
                    await self._sleep(backoff * (1 + random.random() / 2))
                    backoff = min(backoff * 2, self._max_backoff_s)
                    continue
                if len(records) == 1:
                    await self._dead_letter(records[0], exc)
                    return True
                log.warning(
                    "batch failed, isolating the bad record",
                    extra={"group": self.group, "error": repr(exc), "size": len(records)},
                )
                for record in records:
                    if not await self._process([record]):
                        return False
                return True

    async def _dead_letter(self, record: Record, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"[:2000]
        headers = (
            *record.headers,
            ("nbv-dlq-reason", reason.encode()),
            ("nbv-dlq-group", self.group.encode()),
            (
                "nbv-dlq-origin",
                json.dumps([record.topic, record.partition, record.offset]).encode(),
            ),
        )
        await self._bus.publish(self._dlq, [Message(record.key, record.value, headers)])
        DEAD_LETTERS.labels(self.group).inc()
        CONSUMER_RECORDS.labels(self.group, "dead_letter").inc()
        log.error(
            "record sent to dead-letter topic",
            extra={
                "group": self.group,
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "reason": reason,
            },
        )

    async def _lag_loop(self) -> None:
        assert self._consumer is not None
        while not self._stopping.is_set():
            await self._report_lag(self._consumer)
            await self._sleep(self._lag_interval_s)

    async def _report_lag(self, consumer: Consumer) -> None:
        try:
            lag = await asyncio.wait_for(consumer.lag(), timeout=max(5.0, self._lag_interval_s))
        except Exception as exc:
            # Unknown now (broker away, rebalance): keep the last values rather than show 0.
            log.debug("lag unavailable", extra={"group": self.group, "error": repr(exc)})
            return
        for (topic, partition), value in lag.items():
            CONSUMER_LAG.labels(self.group, topic, str(partition)).set(value)
        # Partitions moved to another member after a rebalance: that member reports them now,
        # and a frozen value here would keep a lag alert firing for nothing.
        for topic, partition in self._lag_series - lag.keys():
            with contextlib.suppress(KeyError):
                CONSUMER_LAG.remove(self.group, topic, str(partition))
        self._lag_series = set(lag)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
