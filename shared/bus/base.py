"""The bus: what the services need from an ordered, durable, partitioned log.

Two implementations share this interface: Kafka (production) and an embedded SQLite log
(single-process mode). Delivery is at-least-once: a consumer commits only after the work a
record caused is durable, so consumers must be idempotent.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import NamedTuple


class Message(NamedTuple):
    """Something to publish. ``key`` decides the partition, so one key stays in order.

    A named tuple, like Record: the intake makes two per accepted event (the event, then the
    event with its trace headers)."""

    key: str
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


class Record(NamedTuple):
    """A consumed message. A named tuple rather than a frozen dataclass: consumers build one
    per record (10,000s per second in the projector), and a frozen dataclass's __init__ sets
    each field through ``object.__setattr__``, several times slower."""

    topic: str
    partition: int
    offset: int
    key: str
    value: bytes
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = ()


class Consumer(abc.ABC):
    """A member of a consumer group reading one or more topics."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def fetch(self, max_records: int, timeout_ms: int) -> list[Record]:
        """Next records after the ones already fetched, in order within a partition."""

    @abc.abstractmethod
    async def commit(self) -> None:
        """Mark everything fetched so far as done for the group."""

    @abc.abstractmethod
    async def stop(self) -> None: ...

    async def lag(self) -> dict[tuple[str, int], int]:
        """Records not yet committed, per (topic, partition); empty if unknown."""
        return {}


class Bus(abc.ABC):
    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    async def publish(self, topic: str, messages: Sequence[Message]) -> None:
        """Return only once every message is durably stored (the caller may then ack)."""

    @abc.abstractmethod
    def consumer(self, topics: Sequence[str], group: str) -> Consumer: ...

    @abc.abstractmethod
    async def ready(self) -> bool:
        """Whether the log is reachable right now (for /readyz)."""

    async def purge(self, before_ms: int, limit: int) -> int:
        """Delete up to ``limit`` records published before ``before_ms``; returns how many. A
        broker that enforces retention itself (Kafka's ``retention.ms``) has nothing to do."""
        return 0
