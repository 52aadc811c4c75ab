"""Ingest: accept events over HTTP, publish them, and project them into the customer view."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, status
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from services.ingest.erasure import ErasureReport, erase_user, pseudonym_key
from services.ingest.projector import Projector
from services.ingest.publisher import Accepted, publish
from services.ingest.schedule import IngestScheduler
from services.ingest.sources import SourceRoutes
from services.ingest.summary import (
    AccountViewOut,
    UserViewOut,
    account_summary,
    user_summary,
)
from services.ingest.view import AccountState, UserState, ViewConfig
from shared.access.scopes import Scope, requires
from shared.envelope import InboundEvent
from shared.runtime import Runtime
from shared.store.models import AccountView, UserView

log = logging.getLogger(__name__)

MAX_BATCH = 1_000
UserId = Annotated[str, PathParam(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@\-]+$")]


class EventBatch(BaseModel):
    events: Annotated[list[InboundEvent], Field(min_length=1, max_length=MAX_BATCH)]


class IngestService:
    name = "ingest"

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._config = ViewConfig.from_settings(runtime.settings)
        self._projector = Projector(runtime)
        self._worker = runtime.worker(
            topics=["events"], group="projector", handler=self._projector.handle
        )
        self.scheduler = IngestScheduler(runtime)
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
        self.router.add_api_route(
            "/v1/users/{user_id}",
            self.erase,
            methods=["DELETE"],
            response_model=ErasureReport,
            summary="Erase a person's personal data (docs/privacy.md)",
            responses={503: {"description": "no pseudonym secret configured"}},
        )
        self.router.include_router(SourceRoutes(runtime).router)

    async def start(self) -> None:
        await self._worker.start()
        await self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()
        await self._worker.stop()

    @requires(Scope.EVENTS_WRITE)
    async def post_event(self, event: Annotated[InboundEvent, Body()]) -> Accepted:
        return await publish(self._rt, [event])

    @requires(Scope.EVENTS_WRITE)
    async def post_batch(self, batch: EventBatch) -> Accepted:
        return await publish(self._rt, batch.events)

    @requires(Scope.DECISIONS_READ)
    async def user_view(self, user_id: str) -> UserViewOut:
        async with self._rt.sessions() as session:
            row = await session.get(UserView, user_id)
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no view for user {user_id!r}")
        state = UserState.model_validate(row, from_attributes=True)
        return UserViewOut(**state.model_dump(), summary=user_summary(state, datetime.now(UTC)))

    @requires(Scope.DECISIONS_READ)
    async def account_view(self, account_id: str) -> AccountViewOut:
        async with self._rt.sessions() as session:
            row = await session.get(AccountView, account_id)
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no view for account {account_id!r}")
        state = AccountState.model_validate(row, from_attributes=True)
        return AccountViewOut(
            **state.model_dump(),
            summary=account_summary(state, datetime.now(UTC), self._config),
        )

    async def erase(self, user_id: UserId) -> ErasureReport | JSONResponse:
        """Erase everything NBV holds about the person, keeping the decision log under a
        pseudonym; their events are never projected again. Idempotent: erasing again, or an id
        NBV never saw, answers 200 with zero counts (and the id is still recorded, so events of
        it already on their way are dropped)."""
        key = pseudonym_key(self._rt.settings)
        if key is None:
            return JSONResponse(
                status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                content={
                    "error": "not_configured",
                    "message": "set NBV_PSEUDONYM_SECRET (or NBV_SIGNING_SECRET) to erase people",
                },
            )
        async with self._rt.sessions() as session, session.begin():
            return await erase_user(session, self._rt.dialect, key, user_id, datetime.now(UTC))
