"""Responses — from the API, the widget and tracked email links — back onto the event stream."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import Depends, HTTPException, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.delivery.inbox import PROGRESS, UNANSWERED_STATUSES, Notifier
from shared.access.guard import Principal, caller, forbidden
from shared.access.scopes import Scope, requires
from shared.bus import Message
from shared.envelope import Channel, Identifier, Outcome, ResponseEvent, ResponsePayload, encode
from shared.metrics import MODEL_RESPONSES, RESPONSES
from shared.runtime import Runtime
from shared.scheduler import schedule
from shared.store.models import DecisionRow, Delivery, InboxItem

log = logging.getLogger(__name__)

UNSNOOZE_JOB = "delivery.unsnooze"
WITHDRAW_JOB = "delivery.withdraw"
# The card reaching the impression cap is on the person's screen right now: it is withdrawn a
# little later, so it does not vanish under their eyes and an answer they give it still counts.
WITHDRAW_GRACE = timedelta(hours=1)


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


def response_event(
    *,
    user_id: str,
    account_id: str,
    decision_id: str,
    element_id: str,
    outcome: Outcome,
    channel: Channel,
    event_id: str | None = None,
    at: datetime | None = None,
) -> ResponseEvent:
    return ResponseEvent(
        # The default id makes a repeated report (two clicks, a retried POST) one label.
        id=event_id or f"{decision_id}:{element_id}:{outcome.value}",
        source="delivery",
        type="nbv.response",
        time=at or datetime.now(UTC),
        account_id=account_id,
        user_id=user_id,
        payload=ResponsePayload(
            decision_id=decision_id, element_id=element_id, outcome=outcome, channel=channel
        ),
    )


class Responses:
    def __init__(self, runtime: Runtime, notifier: Notifier) -> None:
        self._rt = runtime
        self._notifier = notifier

    async def publish(self, event: ResponseEvent) -> None:
        # Published first: once it is on the log the response cannot be lost; a retry with the
        # same id is dropped by the projector.
        await self._rt.bus.publish(
            self._rt.topic("events"), [Message(key=event.account_id, value=encode(event))]
        )
        RESPONSES.labels(event.payload.outcome.value, event.payload.channel.value).inc()
        await self._count_by_model(event)

    async def _count_by_model(self, event: ResponseEvent) -> None:
        """Outcomes by the model version that scored the decision, so champion and challenger
        can be compared; a metric, so a failed lookup is logged, never the response's fault."""
        try:
            async with self._rt.sessions() as session:
                version = await session.scalar(
                    select(DecisionRow.model_version).where(
                        DecisionRow.id == event.payload.decision_id
                    )
                )
        except Exception:
            log.warning("model version of a response not found", exc_info=True)
            return
        MODEL_RESPONSES.labels(version or "unknown", event.payload.outcome.value).inc()

    async def _count_impression(self, session: AsyncSession, item: InboxItem) -> None:
        """Every "shown" report is an impression (the widget reports once per page view; the
        event is one label whatever the count). At the cap the card's withdrawal is scheduled."""
        item.impressions = (item.impressions or 0) + 1
        cap = self._rt.settings.inapp_impression_cap
        if cap == 0 or item.impressions != cap:
            return
        # Keyed by the card's offer (its decision and when it was first shown since it was
        # offered or came back from a snooze), so each showing of it is capped once.
        await schedule(
            session,
            self._rt.dialect,
            key=f"{WITHDRAW_JOB}:{item.id}:{item.decision_id}:{item.updated_at.isoformat()}",
            kind=WITHDRAW_JOB,
            due_at=datetime.now(UTC) + WITHDRAW_GRACE,
            payload={
                "card_id": item.id,
                "decision_id": item.decision_id,
                "impressions": item.impressions,
            },
        )

    @requires(Scope.RESPONSES_WRITE, widget=True)
    async def respond(
        self, response: ResponseIn, by: Annotated[Principal, Depends(caller)]
    ) -> ResponseAccepted:
        """Record what the person did with a delivered element; it flows back into the view."""
        if not by.may_act_for(response.user_id):
            raise forbidden("other_user", "this publishable key is for another user")
        async with self._rt.sessions() as session, session.begin():
            item = await session.scalar(
                select(InboxItem).where(
                    InboxItem.user_id == response.user_id,
                    InboxItem.element_id == response.element_id,
                )
            )
            account_id = item.account_id if item else None
            if account_id is None:
                # Delivered by email or as a CSM alert: the ledger knows it.
                account_id = await session.scalar(
                    select(Delivery.account_id)
                    .where(
                        Delivery.user_id == response.user_id,
                        Delivery.element_id == response.element_id,
                        Delivery.decision_id == response.decision_id,
                    )
                    .limit(1)
                )
            if account_id is None:
                raise HTTPException(
                    status.HTTP_404_NOT_FOUND,
                    f"element_id {response.element_id!r} was never delivered to user_id "
                    f"{response.user_id!r}",
                )
            event = response_event(
                user_id=response.user_id,
                account_id=account_id,
                decision_id=response.decision_id,
                element_id=response.element_id,
                outcome=response.outcome,
                channel=response.channel,
                event_id=response.id,
                at=response.time,
            )
            try:
                await self.publish(event)
            except Exception as exc:
                log.exception("response publish failed")
                raise HTTPException(
                    status.HTTP_503_SERVICE_UNAVAILABLE, "event log unavailable"
                ) from exc
            if item is None:
                return ResponseAccepted(event_id=event.id, status="recorded")
            if PROGRESS[response.outcome.value] > PROGRESS.get(item.status, 0):
                item.status = response.outcome.value
                item.updated_at = event.time
                item.closed_reason = None  # an answer to a withdrawn card reopens or closes it
                if response.outcome is Outcome.SNOOZED:
                    await schedule(
                        session,
                        self._rt.dialect,
                        key=f"{UNSNOOZE_JOB}:{item.id}:{event.id}",
                        kind=UNSNOOZE_JOB,
                        due_at=datetime.now(UTC) + timedelta(hours=self._rt.settings.snooze_hours),
                        payload={"card_id": item.id},
                    )
            if (
                response.outcome is Outcome.SHOWN
                and response.channel is Channel.IN_APP
                and response.decision_id == item.decision_id
                and item.status in UNANSWERED_STATUSES
            ):
                await self._count_impression(session, item)
            card_status = item.status
        self._notifier.notify([response.user_id])
        return ResponseAccepted(event_id=event.id, status=card_status)
