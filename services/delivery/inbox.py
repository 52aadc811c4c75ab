"""The in-app inbox: cards written from decisions, read by the API, the live stream and widget."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import case, select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.contracts import (
    OPEN_CARD_STATUSES,
    WITHDRAWN_CARD_STATUS,
    DecidedItem,
    DecisionMessage,
    ElementContent,
)
from shared.store.db import dialect_insert
from shared.store.models import InboxItem

OPEN_STATUSES = OPEN_CARD_STATUSES
# A response never moves a card backwards (a late "shown" after "completed" changes nothing);
# a snoozed card comes back as pending when its snooze ends. A withdrawn card ranks with
# "shown": a stale widget's late "shown" leaves it withdrawn, while an answer the person gives
# it (they may still have it on screen) wins over the withdrawal.
PROGRESS = {
    "pending": 0,
    "shown": 1,
    WITHDRAWN_CARD_STATUS: 1,
    "clicked": 2,
    "snoozed": 3,
    "completed": 4,
    "dismissed": 4,
}
# Cards nobody has answered yet, the only ones impression capping withdraws (a click is an
# answer: the person started it).
UNANSWERED_STATUSES = ("pending", "shown")


class InboxCard(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    decision_id: str
    element_id: str
    rank: int
    score: float
    status: str
    reason: str
    impressions: int = 0
    closed_reason: str | None = None
    content: ElementContent
    created_at: datetime
    updated_at: datetime


class Inbox(BaseModel):
    user_id: str
    items: list[InboxCard]


def card_id(user_id: str, element_id: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{user_id}/{element_id}"))


def card_row(decision: DecisionMessage, item: DecidedItem) -> dict[str, Any]:
    return {
        "id": card_id(decision.user_id, item.element_id),
        "user_id": decision.user_id,
        "account_id": decision.account_id,
        "element_id": item.element_id,
        "decision_id": decision.decision_id,
        "rank": item.rank,
        "score": item.score,
        "content": item.content.model_dump(mode="json"),
        "status": "pending",
        "reason": item.reason,
        "created_at": decision.created_at,
        "updated_at": decision.created_at,
    }


async def upsert_cards(session: AsyncSession, dialect: str, rows: Sequence[dict[str, Any]]) -> None:
    # Later decisions for the same (user, element) win within the batch.
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r["updated_at"]):
        latest[(row["user_id"], row["element_id"])] = row
    if not latest:
        return
    stmt = dialect_insert(dialect, InboxItem).values(list(latest.values()))
    # A re-offer refreshes an open card and reopens a withdrawn one, each a new offer that
    # starts counting impressions again; closed ones (completed, dismissed) stay closed, snoozed
    # ones wait for their snooze to end, and an older decision never overwrites a newer one.
    withdrawn = InboxItem.status == WITHDRAWN_CARD_STATUS
    stmt = stmt.on_conflict_do_update(
        index_elements=["user_id", "element_id"],
        set_={
            **{
                c: stmt.excluded[c]
                for c in ("decision_id", "rank", "score", "content", "reason", "updated_at")
            },
            "status": case((withdrawn, "pending"), else_=InboxItem.status),
            "impressions": 0,
            "closed_reason": None,
        },
        where=(InboxItem.status.in_(OPEN_STATUSES) | withdrawn)
        & (InboxItem.updated_at <= stmt.excluded.updated_at),
    )
    await session.execute(stmt)


async def list_cards(
    session: AsyncSession, user_id: str, *, include_closed: bool = False
) -> list[InboxCard]:
    query = select(InboxItem).where(InboxItem.user_id == user_id)
    if not include_closed:
        query = query.where(InboxItem.status.in_(OPEN_STATUSES))
    items = await session.scalars(query.order_by(InboxItem.updated_at.desc(), InboxItem.rank))
    return [InboxCard.model_validate(i) for i in items]


class Notifier:
    """Wakes this process's live streams when a user's cards change. Streams also poll the
    store, so a card written by another delivery replica still arrives (a little later)."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)

    @asynccontextmanager
    async def subscribe(self, user_id: str) -> AsyncIterator[asyncio.Event]:
        event = asyncio.Event()
        self._waiters[user_id].add(event)
        try:
            yield event
        finally:
            self._waiters[user_id].discard(event)
            if not self._waiters[user_id]:
                del self._waiters[user_id]

    def notify(self, user_ids: Iterable[str]) -> None:
        for user_id in set(user_ids):
            for event in self._waiters.get(user_id, ()):
                event.set()
