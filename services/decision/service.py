"""Decision: the next-best-value API, and proactive decisions on triggers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel
from sqlalchemy import select

from models.ranker import load_champion
from services.decision.engine import Decided, DecisionEngine, UnknownUser
from services.decision.library import DEFAULT_LIBRARY, active_elements, load_library, seed_library
from shared.bus import Message, Record
from shared.contracts import DecidedItem
from shared.envelope import Channel, TriggerEvent, decode
from shared.metrics import MODEL_INFO
from shared.runtime import Runtime
from shared.store.db import upsert
from shared.store.models import DecisionRow, ProcessedEvent, UserView
from shared.worker import PoisonRecord

log = logging.getLogger(__name__)

TRIGGER_CONSUMER = "decision-triggers"
MAX_USERS_PER_ACCOUNT_TRIGGER = 50


class NextBestValue(BaseModel):
    decision_id: str
    user_id: str
    model_version: str
    items: list[DecidedItem]


class DecisionLog(BaseModel):
    id: str
    user_id: str
    account_id: str
    created_at: Any
    channel: str | None
    trigger: str | None
    policy: str
    model_version: str
    context: dict[str, Any]
    candidates: list[Any]
    chosen: list[Any]


class DecisionService:
    name = "decision"

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        settings = runtime.settings
        self.engine = DecisionEngine(
            load_champion(settings.model_dir), settings.exploration_epsilon, settings.decision_seed
        )
        self._worker = runtime.worker(
            topics=["triggers"], group="decision", handler=self.handle_triggers
        )
        self.router = APIRouter(tags=["decision"])
        self.router.add_api_route("/v1/next-best-value", self.next_best_value, methods=["GET"])
        self.router.add_api_route("/v1/decisions/{decision_id}", self.get_decision, methods=["GET"])

    async def start(self) -> None:
        library = load_library(self._rt.settings.library_path or DEFAULT_LIBRARY)
        async with self._rt.sessions() as session, session.begin():
            if await seed_library(session, library, self._rt.dialect):
                log.info("library seeded", extra={"version": library.version})
            self.engine.elements = await active_elements(session)
        MODEL_INFO.labels(self.engine.ranker.version, self.engine.ranker.kind).set(1)
        await self._worker.start()

    async def stop(self) -> None:
        await self._worker.stop()

    async def _publish(self, decided: Sequence[Decided]) -> None:
        messages = [
            Message(
                key=d.message.account_id,
                value=d.message.model_dump_json().encode(),
                headers=(("nbv-decision-id", d.message.decision_id.encode()),),
            )
            for d in decided
            if d.message.items
        ]
        if messages:
            await self._rt.bus.publish(self._rt.topic("decisions"), messages)

    async def next_best_value(
        self,
        user_id: Annotated[str, Query(min_length=1, max_length=200)],
        limit: Annotated[int, Query(ge=1, le=20)] = 3,
        channel: Channel = Channel.IN_APP,
    ) -> NextBestValue:
        """Rank the eligible Value Elements for one person and log the decision.

        The chosen items are also handed to delivery (for ``in_app``: the person's inbox).
        """
        async with self._rt.sessions() as session:
            try:
                decided = await self.engine.decide(session, user_id, channel=channel, limit=limit)
            except UnknownUser:
                raise HTTPException(
                    status.HTTP_404_NOT_FOUND,
                    f"unknown user_id {user_id!r}: no events received for this user yet",
                ) from None
            await session.flush()
            try:
                await self._publish([decided])
            except Exception as exc:
                log.exception("decision publish failed")
                raise HTTPException(
                    status.HTTP_503_SERVICE_UNAVAILABLE, "decision log unavailable"
                ) from exc
            await session.commit()
        m = decided.message
        return NextBestValue(
            decision_id=m.decision_id,
            user_id=m.user_id,
            model_version=m.model_version,
            items=m.items,
        )

    async def get_decision(self, decision_id: str) -> DecisionLog:
        async with self._rt.sessions() as session:
            row = await session.get(DecisionRow, decision_id)
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown decision {decision_id!r}")
        return DecisionLog.model_validate(row, from_attributes=True)

    async def handle_triggers(self, records: Sequence[Record]) -> None:
        """Proactive mode: each trigger (once, by its id) leads to a decision for its people."""
        triggers: list[TriggerEvent] = []
        for record in records:
            event = decode(record.value)
            if not isinstance(event, TriggerEvent):
                raise PoisonRecord(f"not a trigger: {event.type}")
            triggers.append(event)
        async with self._rt.sessions() as session, session.begin():
            claimed = set(
                (
                    await session.execute(
                        upsert(
                            self._rt.dialect,
                            ProcessedEvent,
                            [{"consumer": TRIGGER_CONSUMER, "event_id": t.id} for t in triggers],
                            ["consumer", "event_id"],
                        ).returning(ProcessedEvent.event_id)
                    )
                ).scalars()
            )
            decided: list[Decided] = []
            for trigger in triggers:
                if trigger.id not in claimed:
                    continue
                claimed.discard(trigger.id)  # a batch may carry the same trigger twice
                for user_id in await self._audience(session, trigger):
                    try:
                        decided.append(
                            await self.engine.decide(
                                session,
                                user_id,
                                channel=None,
                                limit=1,
                                trigger=trigger.payload.trigger,
                            )
                        )
                    except UnknownUser:
                        continue
            await session.flush()
            await self._publish(decided)

    async def _audience(self, session: Any, trigger: TriggerEvent) -> list[str]:
        if trigger.user_id:
            return [trigger.user_id]
        rows = await session.scalars(
            select(UserView.user_id)
            .where(UserView.account_id == trigger.account_id)
            .order_by(UserView.user_id)
            .limit(MAX_USERS_PER_ACCOUNT_TRIGGER)
        )
        return list(rows)
