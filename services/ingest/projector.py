"""The projector: events topic → single customer view, idempotently, batch by batch.

One transaction per batch: claim the event ids in the idempotency ledger, check out every
touched user and account (view_rows.py: from the projector's cache of its own rows, re-reading
only rows someone else changed), fold the events in event-time order, write the rows back in
one upsert per table, and plan the accounts' timers. Triggers are published before the commit;
the rows go back into the cache after it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from services.ingest.erasure import ErasureGuard
from services.ingest.schedule import account_jobs, add_jobs
from services.ingest.triggers import to_message
from services.ingest.view import (
    Trigger,
    UserState,
    ViewConfig,
    apply_event,
    new_account,
    new_user,
    refresh_scores,
)
from services.ingest.view_rows import ViewRows, Written
from shared.bus import Record
from shared.envelope import Event, GroupEvent, ResponseEvent, SubscriptionEvent, decode
from shared.metrics import EVENT_TO_VIEW, observe_many
from shared.runtime import Runtime
from shared.store.db import upsert
from shared.store.models import Intervention, ProcessedEvent, UserAccount
from shared.worker import PoisonRecord

log = logging.getLogger(__name__)

CONSUMER = "projector"
YIELD_EVERY = 500
# One statement claims a whole batch, its ids as one JSON array (see view_rows.py for why).
CLAIM_PG = (
    "INSERT INTO processed_events (consumer, event_id, processed_at) "
    "SELECT $1, event_id, $3 FROM json_array_elements_text($2::text::json) AS t(event_id) "
    "ON CONFLICT (consumer, event_id) DO NOTHING RETURNING event_id"
)


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
        self._config = ViewConfig.from_settings(runtime.settings)
        self._claim_sqlite = (
            sqlite.insert(ProcessedEvent)
            .on_conflict_do_nothing(index_elements=["consumer", "event_id"])
            .returning(ProcessedEvent.event_id)
        )
        self._rows = ViewRows(runtime.dialect, runtime.settings.projector_cache_rows)
        self._erasures = ErasureGuard(runtime.settings)

    async def handle(self, records: Sequence[Record]) -> None:
        events = decode_records(records)
        async with self._rt.sessions() as session, session.begin():
            fresh = await self._claim(session, events)
            # Erased people stay erased on a replay: their events are claimed, then dropped.
            fresh = await self._erasures.admit(session, fresh)
            if not fresh:
                return
            triggers, written = await self._apply(session, fresh)
            # Published before the commit: if the commit fails the batch is redelivered and the
            # triggers are sent again with the same ids, which the decision service ignores.
            if triggers:
                await self._rt.bus.publish(
                    self._rt.topic("triggers"), [to_message(t) for t in triggers]
                )
        # Only now: the rows the batch folded are what the store holds.
        self._rows.checkin(written)
        # Every record of the batch, as before (redelivered ones included): one value each.
        now_ms = time.time() * 1000
        observe_many(EVENT_TO_VIEW, [max(0.0, now_ms - r.timestamp_ms) / 1000 for r in records])

    async def _claim(self, session: AsyncSession, events: Sequence[Event]) -> list[Event]:
        """Record the ids in the idempotency ledger; keep the events not applied before."""
        unique = list({e.id: e for e in events}.values())
        conn = await session.connection()
        if self._rt.dialect == "postgresql":
            ids = orjson.dumps([e.id for e in unique]).decode()
            result = await conn.exec_driver_sql(CLAIM_PG, (CONSUMER, ids, datetime.now(UTC)))
        else:
            rows = [{"consumer": CONSUMER, "event_id": e.id} for e in unique]
            result = await conn.execute(self._claim_sqlite, rows)
        claimed = set(result.scalars())
        return [e for e in unique if e.id in claimed]

    async def _apply(
        self, session: AsyncSession, events: Sequence[Event]
    ) -> tuple[list[Trigger], Written]:
        config = self._config
        user_ids = {e.user_id for e in events if e.user_id}
        account_ids = {e.account_id for e in events}
        conn = await session.connection()
        users, accounts = await self._rows.checkout(conn, user_ids, account_ids)
        triggers: list[Trigger] = []
        interventions: list[dict[str, Any]] = []
        memberships: dict[str, dict[str, Any]] = {}
        last_cause: dict[str, Event] = {}
        billing_changed: set[str] = set()
        # Event time, then id: the same batch folds the same way on every replay.
        for n, event in enumerate(sorted(events, key=lambda e: (e.time, e.id)), start=1):
            if n % YIELD_EVERY == 0:
                # A large batch folds for a good part of a second; the HTTP intake in the same
                # process keeps answering meanwhile (its requests mostly wait on the broker).
                await asyncio.sleep(0)
            account = accounts.get(event.account_id)
            if account is None:
                account = accounts[event.account_id] = new_account(event)
            user: UserState | None = None
            if event.user_id:
                user = users.get(event.user_id)
                if user is None:
                    user = users[event.user_id] = new_user(event)
                    account.user_count += 1
            triggers += apply_event(account, user, event, config)
            last_cause[event.account_id] = event
            if isinstance(event, SubscriptionEvent):
                billing_changed.add(event.account_id)
            elif isinstance(event, GroupEvent) and event.user_id:
                memberships[event.user_id] = {
                    "user_id": event.user_id,
                    "account_id": event.account_id,
                    "updated_at": event.time,
                }
            elif isinstance(event, ResponseEvent):
                interventions.append(_intervention(event))
        for account_id in account_ids:
            triggers += refresh_scores(accounts[account_id], last_cause[account_id], config)
        written = await self._rows.write(
            conn,
            [users[u] for u in sorted(user_ids)],
            [accounts[a] for a in sorted(account_ids)],
        )
        if interventions:
            await session.execute(
                upsert(self._rt.dialect, Intervention, interventions, ["event_id"])
            )
        if memberships:
            await session.execute(
                upsert(
                    self._rt.dialect,
                    UserAccount,
                    list(memberships.values()),
                    ["user_id"],
                    ["account_id", "updated_at"],
                )
            )
        if billing_changed:
            s = self._rt.settings
            now = datetime.now(UTC)
            jobs = [
                job
                for a in sorted(billing_changed)
                for job in account_jobs(
                    accounts[a], s.renewal_notice_days, s.onboarding_check_days, now
                )
            ]
            await add_jobs(session, self._rt.dialect, jobs)
        return triggers, written


def _intervention(event: ResponseEvent) -> dict[str, Any]:
    return {
        "event_id": event.id,
        "decision_id": event.payload.decision_id,
        "user_id": event.user_id,
        "account_id": event.account_id,
        "element_id": event.payload.element_id,
        "outcome": event.payload.outcome.value,
        "channel": event.payload.channel.value,
        "at": event.time,
    }
