"""Ingest: accept events over HTTP, publish them, and project them into the customer view."""

from __future__ import annotations

import logging
import time
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, status
from pydantic import BaseModel, Field

from services.ingest.projector import Projector
from services.ingest.view import AccountState, UserState
from shared.bus import Message
from shared.envelope import InboundEvent, encode
from shared.metrics import EVENTS_INGESTED
from shared.runtime import Runtime
from shared.store.models import AccountView, UserView

log = logging.getLogger(__name__)

MAX_BATCH = 1_000


class EventBatch(BaseModel):
    events: Annotated[list[InboundEvent], Field(min_length=1, max_length=MAX_BATCH)]


class Accepted(BaseModel):
    accepted: int
    ids: list[str]


class IngestService:
    name = "ingest"

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._projector = Projector(runtime)
        self._worker = runtime.worker(
            topics=["events"], group="projector", handler=self._projector.handle
        )
        self.router = APIRouter(tags=["ingest"])
        self.router.add_api_route(
            "/v1/events",
            self.post_event,
            methods=["POST"],
            status_code=status.HTTP_202_ACCEPTED,
            summary="Accept one event",
        )
        self.router.add_api_route(
            "/v1/events/batch",
            self.post_batch,
            methods=["POST"],
            status_code=status.HTTP_202_ACCEPTED,
            summary=f"Accept up to {MAX_BATCH} events at once (all or none)",
        )
        self.router.add_api_route("/v1/users/{user_id}/view", self.user_view, methods=["GET"])
        self.router.add_api_route(
            "/v1/accounts/{account_id}/view", self.account_view, methods=["GET"]
        )

    async def start(self) -> None:
        await self._worker.start()

    async def stop(self) -> None:
        await self._worker.stop()

    async def _publish(self, events: list[InboundEvent]) -> Accepted:
        published_ms = str(int(time.time() * 1000)).encode()
        messages = [
            Message(
                key=e.account_id,
                value=encode(e),
                headers=(("nbv-event-id", e.id.encode()), ("nbv-published-ms", published_ms)),
            )
            for e in events
        ]
        try:
            await self._rt.bus.publish(self._rt.topic("events"), messages)
        except Exception as exc:
            log.exception("publish failed")
            # Nothing was acknowledged: the sender retries with the same ids, duplicates are
            # dropped by the projector.
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE, "event log unavailable"
            ) from exc
        for e in events:
            EVENTS_INGESTED.labels(e.source, e.type).inc()
        return Accepted(accepted=len(events), ids=[e.id for e in events])

    async def post_event(self, event: Annotated[InboundEvent, Body()]) -> Accepted:
        return await self._publish([event])

    async def post_batch(self, batch: EventBatch) -> Accepted:
        return await self._publish(batch.events)

    async def user_view(self, user_id: str) -> UserState:
        async with self._rt.sessions() as session:
            row = await session.get(UserView, user_id)
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no view for user {user_id!r}")
        return UserState.model_validate(row, from_attributes=True)

    async def account_view(self, account_id: str) -> AccountState:
        async with self._rt.sessions() as session:
            row = await session.get(AccountView, account_id)
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no view for account {account_id!r}")
        return AccountState.model_validate(row, from_attributes=True)
