"""Erasing a person (``DELETE /v1/users/{id}``), and keeping them erased (docs/privacy.md).

One transaction: the person's id goes into the erasure ledger as a pseudonym (HMAC-SHA256 with
a secret from the environment); the decision log (decisions, their contacts and the response
labels) keeps its rows under that pseudonym, so training data and aggregate metrics stay usable;
every other row holding the id is deleted — the view, group memberships, inbox cards, the
delivery ledger, preferences, their scheduled jobs, and the rows of any table with a ``user_id``
column added later — and account roll-ups forget the person as a contact.

The events topic still holds the person's events until its retention deletes them. The
projector asks ``ErasureGuard`` about each batch's people (one indexed lookup) and drops the
events of anyone in the ledger, so a replay from offset 0 does not bring them back; delivery
does the same for decisions still in flight. Erasure and those batches are serialised by a
PostgreSQL advisory lock (SQLite has a single writer already), so a batch that read the person
before the erasure cannot write them back after it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import String, Table, cast, delete, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from services.ingest.triggers import TriggerName
from shared.envelope import Event
from shared.metrics import ERASED_EVENTS_DROPPED, ERASURES
from shared.settings import Settings
from shared.signing import keyed_digest
from shared.store.db import upsert
from shared.store.models import (
    AccountView,
    Base,
    Contact,
    DecisionRow,
    Delivery,
    Erasure,
    InboxItem,
    Intervention,
    ProcessedEvent,
    ScheduledJob,
    UserView,
)

log = logging.getLogger(__name__)

PSEUDONYM_PREFIX = "erased:"
# The decision log and its labels: kept for training and metrics, under the pseudonym.
PSEUDONYMISED = (DecisionRow.__tablename__, Contact.__tablename__, Intervention.__tablename__)
# Time-based triggers carry the person in their id (services/ingest/schedule.py), and the
# decision service records those ids in its idempotency ledger.
_TRIGGER_IDS = (TriggerName.USAGE_DROP, TriggerName.INACTIVE)
# An application-wide advisory lock key ("NBVERASE"): erasures take it exclusively; projector,
# decision and delivery transactions, shared.
_FENCE = 0x4E42564552415345


def pseudonym_key(settings: Settings) -> bytes | None:
    """The pseudonyms' key; None when no secret is set (erasure is then refused)."""
    secret = (
        settings.pseudonym_secret.get_secret_value() or settings.signing_secret.get_secret_value()
    )
    return secret.encode() if secret else None


def pseudonym(key: bytes, user_id: str) -> str:
    return PSEUDONYM_PREFIX + keyed_digest(key, user_id)


async def fence(session: AsyncSession | AsyncConnection, *, exclusive: bool) -> None:
    """Order this transaction against erasures (released at commit or rollback). Everything
    that reads a person and then writes about them takes it: the projector, the decision
    engine and delivery, shared; an erasure, exclusively."""
    bind = session if isinstance(session, AsyncConnection) else session.get_bind()
    if bind.dialect.name != "postgresql":
        return
    await session.execute(_EXCLUSIVE if exclusive else _SHARED, {"key": _FENCE})


# Taking the fence shared as the first statement of a transaction, in the simple-query form
# (one round trip for both): for writers that run on the driver (the decision log's committer).
BEGIN_FENCED_SQL = f"BEGIN; SELECT pg_advisory_xact_lock_shared({_FENCE})"

# Built once: every decision takes the fence, and a text() built per call is parsed and given a
# cache key each time.
_EXCLUSIVE = text("SELECT pg_advisory_xact_lock(:key)")
_SHARED = text("SELECT pg_advisory_xact_lock_shared(:key)")


class ErasureReport(BaseModel):
    """What an erasure did, per table (zero everywhere for an id already erased or unknown)."""

    user_id: str
    pseudonym: str = Field(description="the id the decision log keeps for this person")
    known: bool = Field(description="whether NBV held anything about this id")
    erased_at: datetime
    deleted: dict[str, int] = Field(description="table → rows deleted")
    pseudonymised: dict[str, int] = Field(description="table → rows now under the pseudonym")
    updated: dict[str, int] = Field(description="table → roll-up rows the person was removed from")


def _user_tables() -> list[Table]:
    """Every table keyed by a person except the pseudonymised ones, including tables added
    after this was written: deleting is the default."""
    return [
        t for t in Base.metadata.sorted_tables if "user_id" in t.c and t.name not in PSEUDONYMISED
    ]


def _like_prefix(prefix: str) -> str:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


async def _rowcount(session: AsyncSession, stmt: Any) -> int:
    conn = await session.connection()
    return int((await conn.execute(stmt)).rowcount or 0)


async def erase_user(
    session: AsyncSession, dialect: str, key: bytes, user_id: str, now: datetime
) -> ErasureReport:
    """Erase one person; the caller commits. Idempotent: a second run changes nothing."""
    # A scan of the idempotency ledger (no index serves it): done before taking the fence, so
    # projector batches are not held up meanwhile. Nothing the projector writes matches.
    ledger_rows = await _rowcount(
        session,
        delete(ProcessedEvent).where(
            or_(
                *(
                    ProcessedEvent.event_id.like(_like_prefix(f"{t}:{user_id}:"), escape="\\")
                    for t in _TRIGGER_IDS
                )
            )
        ),
    )
    await fence(session, exclusive=True)
    alias = pseudonym(key, user_id)
    # First, so the person stays erased whatever arrives once this commits.
    await session.execute(
        upsert(dialect, Erasure, [{"pseudonym": alias, "erased_at": now}], ["pseudonym"])
    )
    home = await session.scalar(select(UserView.account_id).where(UserView.user_id == user_id))
    cards = list(await session.scalars(select(InboxItem.id).where(InboxItem.user_id == user_id)))
    sends = list(await session.scalars(select(Delivery.id).where(Delivery.user_id == user_id)))
    deleted: dict[str, int] = {ProcessedEvent.__tablename__: ledger_rows}
    payload = ScheduledJob.payload
    jobs = [payload["user_id"].as_string() == user_id]
    if sends:
        jobs.append(payload["delivery_id"].as_string().in_(sends))
    if cards:
        jobs.append(payload["card_id"].as_string().in_(cards))
    # Every status: done jobs keep the person in their key and payload too.
    deleted[ScheduledJob.__tablename__] = await _rowcount(
        session, delete(ScheduledJob).where(or_(*jobs))
    )
    pseudonymised: dict[str, int] = {}
    for name in PSEUDONYMISED:
        table = Base.metadata.tables[name]
        pseudonymised[name] = await _rowcount(
            session, update(table).where(table.c.user_id == user_id).values(user_id=alias)
        )
    updated = {AccountView.__tablename__: await _forget_contact(session, user_id, home)}
    for table in _user_tables():
        deleted[table.name] = await _rowcount(
            session, delete(table).where(table.c.user_id == user_id)
        )
    known = any(n for counts in (deleted, pseudonymised, updated) for n in counts.values())
    ERASURES.labels("yes" if known else "no").inc()
    report = ErasureReport(
        user_id=user_id,
        pseudonym=alias,
        known=known,
        erased_at=now,
        deleted=deleted,
        pseudonymised=pseudonymised,
        updated=updated,
    )
    # The log carries everything the caller got back except the id in clear.
    log.info("person erased", extra=report.model_dump(exclude={"user_id", "erased_at"}))
    return report


async def _forget_contact(session: AsyncSession, user_id: str, home: str | None) -> int:
    """Account roll-ups hold people by id only as the account's contacts (role → user id); the
    person's own account also stops counting them. Usage counts stay: they name nobody."""
    named = cast(AccountView.contacts, String).like("%" + _like_prefix(f'"{user_id}"'), escape="\\")
    rows = await session.execute(
        select(AccountView.account_id, AccountView.contacts, AccountView.user_count).where(
            or_(named, AccountView.account_id == home) if home else named
        )
    )
    changed = 0
    for account_id, old_contacts, old_count in rows.tuples().all():
        contacts = {role: who for role, who in old_contacts.items() if who != user_id}
        user_count = max(0, old_count - 1) if account_id == home else old_count
        if contacts != old_contacts or user_count != old_count:
            await session.execute(
                update(AccountView)
                .where(AccountView.account_id == account_id)
                .values(contacts=contacts, user_count=user_count)
            )
            changed += 1
    return changed


class ErasureGuard:
    """Which of a batch's people were erased: their events and decisions are dropped."""

    def __init__(self, settings: Settings | None = None, *, key: bytes | None = None) -> None:
        # Without a key nobody can have been erased (the endpoint refuses), so nothing to ask.
        self._key = pseudonym_key(settings) if settings is not None else key

    async def erased(
        self, session: AsyncSession | AsyncConnection, user_ids: Iterable[str]
    ) -> set[str]:
        """The erased among ``user_ids``, in one indexed lookup, taken after any erasure in
        progress has committed (the batch then sees it)."""
        if self._key is None:
            return set()
        await fence(session, exclusive=False)
        by_alias = {pseudonym(self._key, u): u for u in set(user_ids)}
        if not by_alias:
            return set()
        found = await session.scalars(
            select(Erasure.pseudonym).where(Erasure.pseudonym.in_(list(by_alias)))
        )
        return {by_alias[a] for a in found}

    async def admit(self, session: AsyncSession, events: Sequence[Event]) -> list[Event]:
        """``events`` without those of erased people (counted, never dead-lettered)."""
        if not events:
            return []
        erased = await self.erased(session, (e.user_id for e in events if e.user_id))
        if not erased:
            return list(events)
        kept = [e for e in events if e.user_id not in erased]
        dropped = len(events) - len(kept)
        ERASED_EVENTS_DROPPED.inc(dropped)
        assert self._key is not None
        log.info(
            "events of erased people dropped",
            extra={
                "dropped": dropped,
                "pseudonyms": sorted(pseudonym(self._key, u) for u in erased),
            },
        )
        return kept
