"""What every service gets to work with: settings, the bus and the store."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

from fastapi import APIRouter
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from shared.bus import Bus, create_bus
from shared.settings import Settings
from shared.store.db import create_engine, session_factory
from shared.worker import ConsumerWorker

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    bus: Bus
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    workers: list[ConsumerWorker] = field(default_factory=list)

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        engine = create_engine(settings.resolved_database_url, settings.db_pool_size)
        return cls(settings, create_bus(settings), engine, session_factory(engine))

    @cached_property
    def signing_key(self) -> bytes:
        """NBV_SIGNING_SECRET: signs email links and publishable widget keys. Unset, a random
        key for this process (fine for a trial; set it wherever links must outlive a restart or
        be read by another replica)."""
        secret = self.settings.signing_secret.get_secret_value()
        if secret:
            return secret.encode()
        log.warning(
            "NBV_SIGNING_SECRET is not set: using a random one, so email links and widget keys "
            "stop working after a restart and differ between replicas"
        )
        return secrets.token_bytes(32)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def topic(self, name: str) -> str:
        return self.settings.topic(name)

    def worker(self, *, topics: list[str], group: str, handler: object) -> ConsumerWorker:
        worker = ConsumerWorker(
            bus=self.bus,
            topics=[self.topic(t) for t in topics],
            # Prefixed like the topics, so two deployments on one cluster never share a group.
            group=self.settings.topic_prefix + group,
            handler=handler,  # type: ignore[arg-type]
            dead_letter_topic=self.topic("dead-letter"),
            batch_size=self.settings.consumer_batch_size,
            poll_ms=self.settings.consumer_poll_ms,
            lag_interval_s=self.settings.consumer_lag_interval_s,
        )
        self.workers.append(worker)
        return worker


class Service(Protocol):
    """A service contributes HTTP routes and background work to a process."""

    name: str
    router: APIRouter

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
