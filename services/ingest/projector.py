"""The projector: events topic → single customer view, idempotently, batch by batch.

One transaction per batch: claim the event ids in the idempotency ledger, load every touched
user and account in two queries, fold the events in event-time order, write the rows back in
one upsert per table, and plan the accounts' timers. Triggers are published before the commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import CursorResult, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from services.ingest.schedule import account_jobs, add_jobs
from services.ingest.triggers import to_message
from services.ingest.view import (
    AccountState,
    Trigger,
    UserState,
    ViewConfig,
    apply_event,
    new_account,
    new_user,
    refresh_scores,
)
from shared.bus import Record
from shared.envelope import Event, GroupEvent, ResponseEvent, SubscriptionEvent, decode
from shared.metrics import EVENT_TO_VIEW
from shared.runtime import Runtime
from shared.store.db import upsert
from shared.store.models import AccountView, Intervention, ProcessedEvent, UserAccount, UserView
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
        self._config = ViewConfig.from_settings(runtime.settings)
        self._statements = _Statements(runtime.dialect)

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
                await self._rt.bus.publish(
                    self._rt.topic("triggers"), [to_message(t) for t in triggers]
                )
        now = time.time()
        for record in records:
            EVENT_TO_VIEW.observe(max(0.0, now - record.timestamp_ms / 1000))

    async def _claim(self, session: AsyncSession, events: Sequence[Event]) -> list[Event]:
        """Record the ids in the idempotency ledger; keep the events not applied before."""
        unique = list({e.id: e for e in events}.values())
        stmt = self._statements.claim
        rows = [{"consumer": CONSUMER, "event_id": e.id} for e in unique]
        claimed = set((await _execute_many(session, stmt, rows)).scalars())
        return [e for e in unique if e.id in claimed]

    async def _load(
        self, session: AsyncSession, user_ids: set[str], account_ids: set[str]
    ) -> tuple[dict[str, UserState], dict[str, AccountState]]:
        # Core rows, not ORM instances: nothing here needs identity tracking, and it is faster.
        conn = await session.connection()
        users: dict[str, UserState] = {}
        if user_ids:
            table = UserView.__table__
            rows = await conn.execute(select(table).where(table.c.user_id.in_(user_ids)))
            users = {r["user_id"]: UserState.model_validate(r) for r in rows.mappings()}
        table = AccountView.__table__
        rows = await conn.execute(select(table).where(table.c.account_id.in_(account_ids)))
        accounts = {r["account_id"]: AccountState.model_validate(r) for r in rows.mappings()}
        return users, accounts

    async def _apply(self, session: AsyncSession, events: Sequence[Event]) -> list[Trigger]:
        config = self._config
        user_ids = {e.user_id for e in events if e.user_id}
        account_ids = {e.account_id for e in events}
        users, accounts = await self._load(session, user_ids, account_ids)
        triggers: list[Trigger] = []
        interventions: list[dict[str, Any]] = []
        memberships: dict[str, dict[str, Any]] = {}
        last_cause: dict[str, Event] = {}
        billing_changed: set[str] = set()
        # Event time, then id: the same batch folds the same way on every replay.
        for event in sorted(events, key=lambda e: (e.time, e.id)):
            account = accounts.get(event.account_id) or new_account(event)
            accounts[event.account_id] = account
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
            if isinstance(event, GroupEvent) and event.user_id:
                memberships[event.user_id] = {
                    "user_id": event.user_id,
                    "account_id": event.account_id,
                    "updated_at": event.time,
                }
            if isinstance(event, ResponseEvent):
                interventions.append(_intervention(event))
        for account_id in account_ids:
            triggers += refresh_scores(accounts[account_id], last_cause[account_id], config)
        await self._write(session, users, accounts, user_ids, account_ids)
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
        return triggers

    async def _write(
        self,
        session: AsyncSession,
        users: dict[str, UserState],
        accounts: dict[str, AccountState],
        user_ids: set[str],
        account_ids: set[str],
    ) -> None:
        touched_users = [users[u].model_dump() for u in sorted(user_ids)]
        if touched_users:
            await _execute_many(session, self._statements.users, touched_users)
        touched_accounts = [accounts[a].model_dump() for a in sorted(account_ids)]
        await _execute_many(session, self._statements.accounts, touched_accounts)


class _Statements:
    """The projector's upserts, built once: executed with many parameter sets, they are
    compiled once and sent in large multi-row batches (SQLAlchemy's insertmanyvalues), instead
    of compiling a new statement with thousands of bind parameters for every batch."""

    def __init__(self, dialect: str) -> None:
        self.claim = _upsert(dialect, ProcessedEvent.__table__, ["consumer", "event_id"], [])
        self.claim = self.claim.returning(ProcessedEvent.__table__.c.event_id)
        self.users = _upsert(dialect, UserView.__table__, ["user_id"], _USER_COLUMNS)
        self.accounts = _upsert(dialect, AccountView.__table__, ["account_id"], _ACCOUNT_COLUMNS)


def _upsert(dialect: str, table: Any, keys: list[str], update: list[str]) -> Any:
    stmt = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
    if not update:
        return stmt.on_conflict_do_nothing(index_elements=keys)
    return stmt.on_conflict_do_update(
        index_elements=keys, set_={c: stmt.excluded[c] for c in update}
    )


async def _execute_many(
    session: AsyncSession, stmt: Any, rows: list[dict[str, Any]]
) -> CursorResult[Any]:
    conn = await session.connection()
    return await conn.execute(stmt, rows)


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
