"""Decisions in, deliveries out: choose each item's channel, record it in the ledger, then
write the in-app card (in the same transaction) or queue the external send.

Guarantees. The ledger row, the inbox card and the first send job commit together, so a
redelivered decision finds its row and does nothing. External sends run as durable scheduler
jobs (``delivery.send``): the ledger says ``pending`` until the channel accepted the message,
then ``sent``. The one window left is a crash after the channel accepted but before ``sent`` was
written: the job's lease runs out and the message is sent again (at least once; emails keep
the same Message-ID and webhooks the same ``X-NBV-Delivery-Id`` so receivers can drop it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select, update

from services.delivery.channels.base import Channel as Sender
from services.delivery.channels.base import Outbound, Person, SendFailed
from services.delivery.inbox import UNANSWERED_STATUSES, Notifier, card_row, upsert_cards
from services.delivery.ledger import (
    SENDABLE,
    Status,
    delivery_key,
    insert_new,
    retry_at,
    schedule_send,
)
from services.delivery.preferences import Preferences, choose_channel, load_preferences, quiet_until
from services.ingest.erasure import ErasureGuard
from shared.bus import Record
from shared.contracts import WITHDRAWN_CARD_STATUS, DecidedItem, DecisionMessage
from shared.envelope import Channel
from shared.metrics import DELIVERIES, DELIVERY_ATTEMPTS, DELIVERY_LATENCY, INBOX_WITHDRAWN
from shared.runtime import Runtime
from shared.scheduler import Job
from shared.store.models import AccountView, Delivery, InboxItem, UserView, ValueElementRow, utcnow
from shared.worker import PoisonRecord

log = logging.getLogger(__name__)


def decode_decisions(records: Sequence[Record]) -> list[DecisionMessage]:
    decisions: list[DecisionMessage] = []
    for record in records:
        try:
            decisions.append(DecisionMessage.model_validate_json(record.value))
        except ValidationError as exc:
            raise PoisonRecord(f"undecodable decision at offset {record.offset}") from exc
    return decisions


class Dispatcher:
    def __init__(
        self, runtime: Runtime, senders: Mapping[Channel, Sender], notifier: Notifier
    ) -> None:
        self._rt = runtime
        self._senders = senders
        self._notifier = notifier
        self._erasures = ErasureGuard(runtime.settings)

    async def handle_decisions(self, records: Sequence[Record]) -> None:
        decided: dict[str, tuple[DecisionMessage, DecidedItem]] = {}
        for d in decode_decisions(records):
            for item in d.items:
                decided[delivery_key(d.decision_id, item.element_id, item.channel.value)] = (
                    d,
                    item,
                )
        if not decided:
            return
        dialect = self._rt.dialect
        now = utcnow()
        async with self._rt.sessions() as session, session.begin():
            seen = set(
                await session.scalars(select(Delivery.id).where(Delivery.id.in_(list(decided))))
            )
            fresh = {k: v for k, v in decided.items() if k not in seen}
            # Decisions still in flight (or replayed) for someone erased since: not delivered.
            erased = await self._erasures.erased(session, {d.user_id for d, _ in fresh.values()})
            fresh = {k: v for k, v in fresh.items() if v[0].user_id not in erased}
            if not fresh:
                return
            users = {d.user_id for d, _ in fresh.values()}
            prefs = await load_preferences(session, users)
            people = {
                r.user_id: (r.email, r.timezone)
                for r in await session.execute(
                    select(UserView.user_id, UserView.email, UserView.timezone).where(
                        UserView.user_id.in_(users)
                    )
                )
            }
            elements = await self._elements(session, {i.element_id for _, i in fresh.values()})
            rows: list[dict[str, Any]] = []
            cards: dict[str, dict[str, Any]] = {}
            sends: dict[str, datetime] = {}
            for key, (d, item) in fresh.items():
                allowed, kind = elements.get(item.element_id, ([item.channel], item.content.kind))
                email, timezone = people.get(d.user_id, (None, None))
                person_prefs = prefs.get(d.user_id, Preferences())
                choice = choose_channel(
                    item.channel,
                    allowed,
                    kind=kind,
                    element_id=item.element_id,
                    prefs=person_prefs,
                    has_email=bool(email),
                    csm_configured=Channel.CSM in self._senders,
                )
                row: dict[str, Any] = {
                    "id": key,
                    "decision_id": d.decision_id,
                    "user_id": d.user_id,
                    "account_id": d.account_id,
                    "element_id": item.element_id,
                    "requested_channel": item.channel.value,
                    "channel": choice.channel.value if choice.channel else None,
                    "reason": choice.reason,
                    "payload": d.model_copy(update={"items": [item]}).model_dump(mode="json"),
                    "attempts": 0,
                    "created_at": now,
                    "updated_at": now,
                    "sent_at": None,
                    "next_attempt_at": None,
                }
                if choice.channel is None:
                    row["status"] = Status.SKIPPED.value
                elif choice.channel is Channel.IN_APP:
                    row.update(status=Status.SENT.value, attempts=1, sent_at=now)
                    cards[key] = card_row(d, item)
                else:
                    due = now
                    if choice.channel is Channel.EMAIL:
                        until = quiet_until(person_prefs.quiet_hours, timezone, now)
                        if until is not None:
                            due = until
                            row["reason"] = "; ".join(
                                filter(
                                    None, [choice.reason, f"quiet hours until {until:%H:%M} UTC"]
                                )
                            )
                    row.update(status=Status.PENDING.value, next_attempt_at=due)
                    sends[key] = due
                rows.append(row)
            inserted = await insert_new(session, dialect, rows)
            await upsert_cards(session, dialect, [c for k, c in cards.items() if k in inserted])
            for key, due in sends.items():
                if key in inserted:
                    await schedule_send(session, dialect, key, due, "0:1")
        self._notifier.notify(cards[k]["user_id"] for k in cards if k in inserted)
        for row in rows:
            if row["id"] not in inserted:
                continue
            channel = row["channel"] or row["requested_channel"]
            if row["status"] == Status.SKIPPED.value:
                DELIVERIES.labels(channel, "skipped").inc()
                log.info(
                    "delivery skipped",
                    extra={"delivery_id": row["id"], "reason": row["reason"]},
                )
            elif row["channel"] != row["requested_channel"]:
                DELIVERIES.labels(channel, "fallback").inc()
            if row["status"] == Status.SENT.value:
                DELIVERIES.labels(channel, "delivered").inc()
                created = fresh[row["id"]][0].created_at
                DELIVERY_LATENCY.labels(channel).observe(max(0.0, (now - created).total_seconds()))

    async def _elements(
        self, session: Any, element_ids: set[str]
    ) -> dict[str, tuple[list[Channel], str | None]]:
        """Each element's allowed channels (for fallbacks) and kind (for opt-outs)."""
        rows = await session.scalars(
            select(ValueElementRow).where(ValueElementRow.id.in_(element_ids))
        )
        out: dict[str, tuple[list[Channel], str | None]] = {}
        for row in rows:
            known = {c.value for c in Channel}
            channels = [Channel(c) for c in row.spec.get("channels", []) if c in known]
            out[row.id] = (channels, row.spec.get("kind"))
        return out

    async def run_send(self, job: Job) -> None:
        """One attempt of one external delivery; schedules its own retry on a transient failure."""
        delivery_id = str(job.payload["delivery_id"])
        run = str(job.payload.get("run", "0"))
        async with self._rt.sessions() as session:
            row = await session.get(Delivery, delivery_id)
            if row is None or row.status not in SENDABLE or row.channel is None:
                return  # already sent, dead or skipped: a re-run sends nothing
            person_row = await session.get(UserView, row.user_id)
            account_row = await session.get(AccountView, row.account_id)
        decision = DecisionMessage.model_validate(row.payload)
        channel = Channel(row.channel)
        outbound = Outbound(
            delivery_id=row.id,
            decision=decision,
            person=Person(
                user_id=row.user_id,
                account_id=row.account_id,
                email=person_row.email if person_row else None,
                name=person_row.name if person_row else None,
                role=person_row.role if person_row else None,
                timezone=person_row.timezone if person_row else None,
            ),
            account=_account_summary(row.account_id, account_row),
            now=utcnow(),
        )
        attempt = row.attempts + 1
        error: SendFailed | None = None
        sender = self._senders.get(channel)
        try:
            if sender is None:
                raise SendFailed(f"channel {channel.value} is not configured", transient=False)
            await sender.send(outbound)
        except SendFailed as exc:
            error = exc
        now = utcnow()
        settings = self._rt.settings
        values: dict[str, Any] = {"attempts": attempt, "updated_at": now}
        if error is None:
            values.update(status=Status.SENT.value, sent_at=now, last_error=None)
            values["next_attempt_at"] = None
            outcome = "delivered"
        elif error.transient and attempt < settings.delivery_max_attempts:
            due = retry_at(
                now, attempt, settings.delivery_retry_base_s, settings.delivery_retry_max_s
            )
            values.update(status=Status.FAILED.value, last_error=str(error), next_attempt_at=due)
            outcome = "retry"
        else:
            values.update(status=Status.DEAD.value, last_error=str(error), next_attempt_at=None)
            outcome = "dead"
        async with self._rt.sessions() as session, session.begin():
            await session.execute(
                update(Delivery)
                .where(Delivery.id == delivery_id, Delivery.status.in_(SENDABLE))
                .values(**values)
            )
            if outcome == "retry":
                await schedule_send(
                    session,
                    self._rt.dialect,
                    delivery_id,
                    values["next_attempt_at"],
                    f"{run}:{attempt + 1}",
                    run=run,
                )
        DELIVERY_ATTEMPTS.labels(channel.value, "ok" if error is None else "error").inc()
        if outcome != "retry":
            DELIVERIES.labels(channel.value, outcome).inc()
        if outcome == "delivered":
            DELIVERY_LATENCY.labels(channel.value).observe(
                max(0.0, (now - decision.created_at).total_seconds())
            )
        elif error is not None:
            log.warning(
                "delivery attempt failed",
                extra={
                    "delivery_id": delivery_id,
                    "channel": channel.value,
                    "attempt": attempt,
                    "error": str(error),
                    "outcome": outcome,
                },
            )

    async def unsnooze(self, job: Job) -> None:
        card = str(job.payload["card_id"])
        async with self._rt.sessions() as session, session.begin():
            # "Later" was an answer: the card comes back with a fresh count of impressions.
            user_id = await session.scalar(
                update(InboxItem)
                .where(InboxItem.id == card, InboxItem.status == "snoozed")
                .values(status="pending", impressions=0, updated_at=utcnow())
                .returning(InboxItem.user_id)
            )
        if user_id:
            self._notifier.notify([user_id])

    async def withdraw(self, job: Job) -> None:
        """Impression capping: close a card still unanswered after its last allowed impression.
        One conditional update, so an answer that came in the meantime (or a new offer of the
        element, another decision) is never overwritten. No response is recorded: for the
        training log the card stays what it was, shown and never answered."""
        impressions = int(job.payload["impressions"])
        async with self._rt.sessions() as session, session.begin():
            user_id = await session.scalar(
                update(InboxItem)
                .where(
                    InboxItem.id == str(job.payload["card_id"]),
                    InboxItem.decision_id == str(job.payload["decision_id"]),
                    InboxItem.status.in_(UNANSWERED_STATUSES),
                    InboxItem.impressions >= impressions,
                )
                .values(
                    status=WITHDRAWN_CARD_STATUS,
                    closed_reason=f"impression cap: shown {impressions} times without an answer",
                    updated_at=utcnow(),
                )
                .returning(InboxItem.user_id)
            )
        if user_id:
            INBOX_WITHDRAWN.inc()
            self._notifier.notify([user_id])


def _account_summary(account_id: str, row: AccountView | None) -> dict[str, Any]:
    if row is None:
        return {"account_id": account_id}
    return {
        "account_id": account_id,
        "plan": row.plan,
        "subscription_status": row.subscription_status,
        "mrr": row.mrr,
        "renewal_date": row.renewal_date.isoformat() if row.renewal_date else None,
        "open_tickets": len(row.open_tickets or {}),
        "last_nps": row.last_nps,
    }
