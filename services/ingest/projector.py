"""The projector: events topic → single customer view, idempotently, batch by batch."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.ingest.view import (
    AccountState,
    Trigger,
    UserState,
    apply_to_account,
    apply_to_user,
    new_account,
    new_user,
)
from shared.bus import Message, Record
from shared.envelope import Event, ResponseEvent, TriggerEvent, TriggerPayload, decode, encode
from shared.metrics import EVENT_TO_VIEW
from shared.runtime import Runtime
from shared.store.db import upsert
from shared.store.models import AccountView, Intervention, ProcessedEvent, UserView
from shared.worker import PoisonRecord

log = logging.getLogger(__name__)

CONSUMER = "projector"
_USER_COLUMNS = [c.name for c in UserView.__table__.columns if c.name != "user_id"]
_ACCOUNT_COLUMNS = [c.name for c in AccountView.__table__.columns if c.name != "account_id"]


def decode_records(records: Sequence[Record]) -> list[Event]:
    events: list[Event] = []
    for record in records:
        try:
            events.append(decode(record.value))
        except ValidationError as exc:
            raise PoisonRecord(f"undecodable event at offset {record.offset}: {exc}") from exc
    return events


class Projector:
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    async def handle(self, records: Sequence[Record]) -> None:
        events = decode_records(records)
        async with self._rt.sessions() as session, session.begin():
            fresh = await self._claim(session, events)
            if not fresh:
                return
            triggers = await self._apply(session, fresh)
            # Published before the commit: if the commit fails the batch is redelivered and the
            # triggers are sent again with the same ids, which the decision service ignores.
            if triggers:
                await self._publish_triggers(triggers)
        now = time.time()
        for record in records:
            EVENT_TO_VIEW.observe(max(0.0, now - record.timestamp_ms / 1000))

    async def _claim(self, session: AsyncSession, events: Sequence[Event]) -> list[Event]:
        """Record the ids in the idempotency ledger; keep the events not applied before."""
        unique = list({e.id: e for e in events}.values())
        stmt = upsert(
            self._rt.dialect,
            ProcessedEvent,
            [{"consumer": CONSUMER, "event_id": e.id} for e in unique],
            keys=["consumer", "event_id"],
        ).returning(ProcessedEvent.event_id)
        claimed = set((await session.execute(stmt)).scalars())
        return [e for e in unique if e.id in claimed]

    async def _apply(self, session: AsyncSession, events: Sequence[Event]) -> list[Trigger]:
        user_ids = {e.user_id for e in events if e.user_id}
        account_ids = {e.account_id for e in events}
        users = {
            row.user_id: UserState.model_validate(row, from_attributes=True)
            for row in (
                await session.scalars(select(UserView).where(UserView.user_id.in_(user_ids)))
            )
        }
        accounts = {
            row.account_id: AccountState.model_validate(row, from_attributes=True)
            for row in (
                await session.scalars(
                    select(AccountView).where(AccountView.account_id.in_(account_ids))
                )
            )
        }
        triggers: list[Trigger] = []
        interventions: list[dict[str, object]] = []
        for event in sorted(events, key=lambda e: e.time):
            account = accounts.get(event.account_id) or new_account(event)
            accounts[event.account_id] = account
            triggers += apply_to_account(account, event)
            if event.user_id:
                user = users.get(event.user_id) or new_user(event)
                users[event.user_id] = user
                triggers += apply_to_user(user, event)
            if isinstance(event, ResponseEvent):
                interventions.append(
                    {
                        "event_id": event.id,
                        "decision_id": event.payload.decision_id,
                        "user_id": event.user_id,
                        "account_id": event.account_id,
                        "element_id": event.payload.element_id,
                        "outcome": event.payload.outcome.value,
                        "channel": event.payload.channel.value,
                        "at": event.time,
                    }
                )
        dialect = self._rt.dialect
        touched_users = [users[u].model_dump() for u in user_ids if u in users]
        if touched_users:
            await session.execute(
                upsert(dialect, UserView, touched_users, ["user_id"], _USER_COLUMNS)
            )
        touched_accounts = [accounts[a].model_dump() for a in account_ids]
        await session.execute(
            upsert(dialect, AccountView, touched_accounts, ["account_id"], _ACCOUNT_COLUMNS)
        )
        if interventions:
            await session.execute(upsert(dialect, Intervention, interventions, ["event_id"]))
        return triggers

    async def _publish_triggers(self, triggers: Sequence[Trigger]) -> None:
        messages = []
        for t in triggers:
            event = TriggerEvent(
                id=f"{t.cause_event_id}:{t.name}",
                source="projector",
                type="nbv.trigger",
                time=t.time,
                account_id=t.account_id,
                user_id=t.user_id,
                payload=TriggerPayload(
                    trigger=t.name, reason=t.reason, cause_event_id=t.cause_event_id
                ),
            )
            messages.append(Message(key=t.account_id, value=encode(event)))
        await self._rt.bus.publish(self._rt.topic("triggers"), messages)
