"""Delivery: decisions → the person's channels (the in-app inbox), responses → the event stream."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select

from shared.bus import Message, Record
from shared.contracts import DecisionMessage, ElementContent
from shared.envelope import Channel, Identifier, Outcome, ResponseEvent, ResponsePayload, encode
from shared.metrics import DELIVERIES, RESPONSES
from shared.runtime import Runtime
from shared.store.db import dialect_insert
from shared.store.models import InboxItem
from shared.worker import PoisonRecord

log = logging.getLogger(__name__)

OPEN_STATUSES = ("pending", "shown", "clicked")
# A response never moves an item backwards (a late "shown" after "completed" changes nothing).
_PROGRESS = {"pending": 0, "shown": 1, "clicked": 2, "completed": 3, "dismissed": 3}


class InboxCard(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    decision_id: str
    element_id: str
    rank: int
    score: float
    status: str
    reason: str
    content: ElementContent
    created_at: datetime
    updated_at: datetime


class Inbox(BaseModel):
    user_id: str
    items: list[InboxCard]


class ResponseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Identifier | None = Field(
        default=None, description="Idempotency key; defaults to decision:element:outcome"
    )
    user_id: Identifier
    decision_id: Identifier
    element_id: Identifier
    outcome: Outcome
    channel: Channel = Channel.IN_APP
    time: datetime | None = None


class ResponseAccepted(BaseModel):
    event_id: str
    status: str


class DeliveryService:
    name = "delivery"

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._worker = runtime.worker(
            topics=["decisions"], group="delivery", handler=self.handle_decisions
        )
        self.router = APIRouter(tags=["delivery"])
        self.router.add_api_route("/v1/users/{user_id}/inbox", self.inbox, methods=["GET"])
        self.router.add_api_route(
            "/v1/responses",
            self.respond,
            methods=["POST"],
            status_code=status.HTTP_202_ACCEPTED,
        )

    async def start(self) -> None:
        await self._worker.start()

    async def stop(self) -> None:
        await self._worker.stop()

    async def handle_decisions(self, records: Sequence[Record]) -> None:
        decisions: list[DecisionMessage] = []
        for record in records:
            try:
                decisions.append(DecisionMessage.model_validate_json(record.value))
            except ValidationError as exc:
                raise PoisonRecord(f"undecodable decision at offset {record.offset}") from exc
        # Later decisions for the same (user, element) win within the batch.
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for d in decisions:
            for item in d.items:
                if item.channel is not Channel.IN_APP:
                    DELIVERIES.labels(item.channel.value, "no_channel_adapter").inc()
                    log.warning(
                        "channel not delivered by this version",
                        extra={"decision_id": d.decision_id, "channel": item.channel.value},
                    )
                    continue
                rows[(d.user_id, item.element_id)] = {
                    "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{d.user_id}/{item.element_id}")),
                    "user_id": d.user_id,
                    "account_id": d.account_id,
                    "element_id": item.element_id,
                    "decision_id": d.decision_id,
                    "rank": item.rank,
                    "score": item.score,
                    "content": item.content.model_dump(mode="json"),
                    "status": "pending",
                    "reason": item.reason,
                    "created_at": d.created_at,
                    "updated_at": d.created_at,
                }
        if not rows:
            return
        stmt = dialect_insert(self._rt.dialect, InboxItem).values(list(rows.values()))
        # A re-offer refreshes an open card; closed ones (completed, dismissed) stay closed, and a
        # redelivered older decision never overwrites a newer one.
        stmt = stmt.on_conflict_do_update(
            index_elements=["user_id", "element_id"],
            set_={
                c: stmt.excluded[c]
                for c in ("decision_id", "rank", "score", "content", "reason", "updated_at")
            },
            where=InboxItem.status.in_(OPEN_STATUSES)
            & (InboxItem.updated_at <= stmt.excluded.updated_at),
        )
        async with self._rt.sessions() as session, session.begin():
            await session.execute(stmt)
        DELIVERIES.labels(Channel.IN_APP.value, "delivered").inc(len(rows))

    async def inbox(
        self,
        user_id: str,
        include_closed: Annotated[bool, Query(description="also completed/dismissed")] = False,
    ) -> Inbox:
        query = select(InboxItem).where(InboxItem.user_id == user_id)
        if not include_closed:
            query = query.where(InboxItem.status.in_(OPEN_STATUSES))
        async with self._rt.sessions() as session:
            items = (
                await session.scalars(query.order_by(InboxItem.updated_at.desc(), InboxItem.rank))
            ).all()
        return Inbox(user_id=user_id, items=[InboxCard.model_validate(i) for i in items])

    async def respond(self, response: ResponseIn) -> ResponseAccepted:
        """Record what the person did with a delivered element; it flows back into the view."""
        async with self._rt.sessions() as session, session.begin():
            item = await session.scalar(
                select(InboxItem).where(
                    InboxItem.user_id == response.user_id,
                    InboxItem.element_id == response.element_id,
                )
            )
            if item is None:
                raise HTTPException(
                    status.HTTP_404_NOT_FOUND,
                    f"element_id {response.element_id!r} was never delivered to user_id "
                    f"{response.user_id!r}",
                )
            event = ResponseEvent(
                id=response.id
                or f"{response.decision_id}:{response.element_id}:{response.outcome.value}",
                source="delivery",
                type="nbv.response",
                time=response.time or datetime.now(UTC),
                account_id=item.account_id,
                user_id=response.user_id,
                payload=ResponsePayload(
                    decision_id=response.decision_id,
                    element_id=response.element_id,
                    outcome=response.outcome,
                    channel=response.channel,
                ),
            )
            # Published first: once it is on the log the response cannot be lost; a retry with
            # the same id is dropped by the projector.
            try:
                await self._rt.bus.publish(
                    self._rt.topic("events"), [Message(key=event.account_id, value=encode(event))]
                )
            except Exception as exc:
                log.exception("response publish failed")
                raise HTTPException(
                    status.HTTP_503_SERVICE_UNAVAILABLE, "event log unavailable"
                ) from exc
            if _PROGRESS[response.outcome.value] > _PROGRESS.get(item.status, 0):
                item.status = response.outcome.value
                item.updated_at = event.time
        RESPONSES.labels(response.outcome.value, response.channel.value).inc()
        return ResponseAccepted(event_id=event.id, status=item.status)
