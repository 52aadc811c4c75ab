"""The single customer view, and how one event changes it (pure functions, no I/O).

Every rule here is order-tolerant where it matters (max/min of times, newest answer wins by
event time), so a late event lands where it belongs and a replay rebuilds the same view.
Updated-at fields follow event time, not wall-clock time, for the same reason.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from shared.envelope import (
    Event,
    IdentifyEvent,
    NpsEvent,
    Outcome,
    ResponseEvent,
    SubscriptionEvent,
    TicketOpenedEvent,
    TicketSolvedEvent,
    TrackEvent,
)

NPS_DETRACTOR_MAX = 6


class UserState(BaseModel):
    user_id: str
    account_id: str
    email: str | None = None
    name: str | None = None
    role: str | None = None
    timezone: str | None = None
    first_seen: datetime
    last_seen: datetime
    event_count: int = 0
    event_counts: dict[str, int] = Field(default_factory=dict)
    track_events: dict[str, int] = Field(default_factory=dict)
    feature_usage: dict[str, int] = Field(default_factory=dict)
    last_nps: int | None = None
    last_nps_at: datetime | None = None
    achieved: dict[str, str] = Field(default_factory=dict)
    dismissed: dict[str, str] = Field(default_factory=dict)
    updated_at: datetime


class AccountState(BaseModel):
    account_id: str
    plan: str | None = None
    subscription_status: str | None = None
    mrr: float | None = None
    renewal_date: datetime | None = None
    first_seen: datetime
    last_seen: datetime
    event_count: int = 0
    open_tickets: dict[str, str] = Field(default_factory=dict)
    last_nps: int | None = None
    last_nps_at: datetime | None = None
    updated_at: datetime


class Trigger(BaseModel):
    """A line the view crossed; the decision service reacts to it."""

    name: str
    reason: str
    account_id: str
    user_id: str | None
    cause_event_id: str
    time: datetime


def new_user(event: Event) -> UserState:
    assert event.user_id is not None
    return UserState(
        user_id=event.user_id,
        account_id=event.account_id,
        first_seen=event.time,
        last_seen=event.time,
        updated_at=event.time,
    )


def new_account(event: Event) -> AccountState:
    return AccountState(
        account_id=event.account_id,
        first_seen=event.time,
        last_seen=event.time,
        updated_at=event.time,
    )


def _bump(counter: dict[str, int], key: str) -> None:
    counter[key] = counter.get(key, 0) + 1


def apply_to_user(user: UserState, event: Event) -> list[Trigger]:
    """Fold one (not yet applied) event into the user's view; return the triggers it fires."""
    triggers: list[Trigger] = []
    user.account_id = event.account_id
    user.first_seen = min(user.first_seen, event.time)
    user.last_seen = max(user.last_seen, event.time)
    user.updated_at = max(user.updated_at, event.time)
    user.event_count += 1
    _bump(user.event_counts, event.type)
    match event:
        case TrackEvent(payload=p):
            _bump(user.track_events, p.event)
            if p.feature_area:
                _bump(user.feature_usage, p.feature_area)
        case IdentifyEvent(payload=p):
            for name in ("email", "name", "timezone"):
                value = getattr(p, name)
                if value is not None:
                    setattr(user, name, value)
            if p.role is not None:
                user.role = p.role.value
        case NpsEvent(payload=p):
            if user.last_nps_at is None or event.time >= user.last_nps_at:
                user.last_nps, user.last_nps_at = p.score, event.time
            if p.score <= NPS_DETRACTOR_MAX:
                triggers.append(_trigger("nps_detractor", f"NPS answer {p.score}", event))
        case ResponseEvent(payload=p):
            at = event.time.isoformat()
            if p.outcome is Outcome.COMPLETED:
                user.achieved.setdefault(p.element_id, at)
            elif p.outcome is Outcome.DISMISSED:
                user.dismissed[p.element_id] = max(at, user.dismissed.get(p.element_id, at))
        case _:
            pass
    return triggers


def apply_to_account(account: AccountState, event: Event) -> list[Trigger]:
    triggers: list[Trigger] = []
    account.first_seen = min(account.first_seen, event.time)
    account.last_seen = max(account.last_seen, event.time)
    account.updated_at = max(account.updated_at, event.time)
    account.event_count += 1
    match event:
        case SubscriptionEvent(payload=p):
            was_active = account.subscription_status in ("active", "trialing")
            account.plan = p.plan
            account.subscription_status = p.status
            account.mrr = p.mrr
            account.renewal_date = p.renewal_date
            if p.status == "active" and not was_active:
                triggers.append(_trigger("contract_signed", f"subscription to {p.plan}", event))
            elif p.status == "past_due":
                triggers.append(_trigger("payment_failed", "subscription past due", event))
        case TicketOpenedEvent(payload=p):
            account.open_tickets[p.ticket_id] = p.priority
        case TicketSolvedEvent(payload=p):
            account.open_tickets.pop(p.ticket_id, None)
        case NpsEvent(payload=p):
            if account.last_nps_at is None or event.time >= account.last_nps_at:
                account.last_nps, account.last_nps_at = p.score, event.time
        case _:
            pass
    return triggers


def _trigger(name: str, reason: str, event: Event) -> Trigger:
    return Trigger(
        name=name,
        reason=reason,
        account_id=event.account_id,
        user_id=event.user_id,
        cause_event_id=event.id,
        time=event.time,
    )
