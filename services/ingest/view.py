"""The single customer view, and how one event changes it (pure functions, no I/O).

Every rule here is order-tolerant where it matters (max/min of times, newest answer wins by
event time, day buckets keyed by event time), so a late event lands where it belongs and a
replay rebuilds the same view. Updated-at fields follow event time, not wall-clock time, for the
same reason. Read-time figures (windows as of now, sophistication, scores) are in summary.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

from pydantic import BaseModel, Field

from services.ingest import health as scores
from services.ingest import windows
from services.ingest.triggers import Trigger, TriggerName, caused_by
from shared.envelope import (
    ContactRoleEvent,
    CsatEvent,
    Event,
    GroupEvent,
    IdentifyEvent,
    InvoicePaidEvent,
    NpsEvent,
    Outcome,
    PageEvent,
    PaymentFailedEvent,
    ResponseEvent,
    Role,
    SubscriptionEvent,
    TicketOpenedEvent,
    TicketSolvedEvent,
    TicketUpdatedEvent,
    TrackEvent,
)
from shared.settings import Settings

__all__ = [
    "AccountState",
    "Trigger",
    "UserState",
    "ViewConfig",
    "apply_event",
    "apply_to_account",
    "apply_to_user",
    "new_account",
    "new_user",
    "refresh_scores",
]

NPS_DETRACTOR_MAX = 6
RECENT_INTERVENTIONS = 50
GENERAL_AREA = "general"
# A track event with this name carries a quiz result: properties.score in 0..1 or 0..100.
QUIZ_EVENT = "quiz_completed"
PAYING = ("active", "trialing")
# A subscription turning past_due this soon after a recorded payment failure is the same story.
SAME_FAILURE = timedelta(days=1)


class ViewConfig(BaseModel):
    """The knobs of the view, from settings (defaults match Settings' defaults)."""

    max_lateness: timedelta = timedelta(days=2)
    usage_drop_pct: float = 50.0
    ticket_spike_7d: int = 3
    health_weights: dict[str, float] = Field(
        default_factory=lambda: dict(Settings.model_fields["health_weights"].default)
    )
    engagement_weights: dict[str, float] = Field(
        default_factory=lambda: dict(Settings.model_fields["engagement_weights"].default)
    )
    health_red_below: float = 40.0
    health_green_from: float = 70.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ViewConfig:
        return cls(
            max_lateness=settings.max_lateness,
            usage_drop_pct=settings.usage_drop_pct,
            ticket_spike_7d=settings.ticket_spike_7d,
            health_weights=settings.health_weights,
            engagement_weights=settings.engagement_weights,
            health_red_below=settings.health_red_below,
            health_green_from=settings.health_green_from,
        )

    @cached_property
    def keep_days(self) -> int:
        return windows.retention_days(self.max_lateness)

    @cached_property
    def area_keep_days(self) -> int:
        return windows.retention_days(self.max_lateness, windows.AREA_WINDOW_DAYS)


DEFAULT_CONFIG = ViewConfig()


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
    # Product usage (track + page) per UTC day of the event, see windows.py.
    daily_usage: dict[str, int] = Field(default_factory=dict)
    last_active: datetime | None = None
    # feature area -> event name -> count: breadth and depth per area.
    area_events: dict[str, dict[str, int]] = Field(default_factory=dict)
    # feature area -> [sum of quiz scores in 0..1, number of quizzes]
    quiz_scores: dict[str, list[float]] = Field(default_factory=dict)
    # feature area -> support tickets the user opened about it
    support_questions: dict[str, int] = Field(default_factory=dict)
    # Recency by area (what is under way now, not only what happened ever): feature area ->
    # UTC day -> product usage that day (the last ``ViewConfig.area_keep_days``, see
    # _user_usage), and feature area -> ISO time of the newest support ticket about it.
    area_daily_usage: dict[str, dict[str, int]] = Field(default_factory=dict)
    area_last_question: dict[str, str] = Field(default_factory=dict)
    tickets_opened: int = 0
    last_csat: int | None = None
    last_csat_at: datetime | None = None
    csat_sum: float = 0.0
    csat_count: int = 0
    # element id -> newest time it was shown, clicked or snoozed (pending unless resolved)
    offered: dict[str, str] = Field(default_factory=dict)
    # The newest responses, newest last: {decision_id, element_id, outcome, channel, at}.
    interventions: list[dict[str, Any]] = Field(default_factory=list)
    crm_roles: list[str] = Field(default_factory=list)
    left_at: datetime | None = None
    milestones: dict[str, str] = Field(default_factory=dict)
    identified_at: datetime | None = None
    role_at: datetime | None = None


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
    name: str | None = None
    subscription_id: str | None = None
    customer_id: str | None = None
    billing_updated_at: datetime | None = None
    contract_signed_at: datetime | None = None
    payment_failures: int = 0
    last_payment_failed_at: datetime | None = None
    invoices_paid: int = 0
    last_invoice_paid_at: datetime | None = None
    user_count: int = 0
    daily_usage: dict[str, int] = Field(default_factory=dict)
    daily_active_users: dict[str, int] = Field(default_factory=dict)
    feature_usage: dict[str, int] = Field(default_factory=dict)
    # feature area -> last UTC day it was used (breadth over a window)
    area_last_used: dict[str, str] = Field(default_factory=dict)
    tickets_daily: dict[str, int] = Field(default_factory=dict)
    tickets_total: int = 0
    # ticket id -> time solved: a late "opened" or "updated" does not reopen it.
    solved_tickets: dict[str, str] = Field(default_factory=dict)
    csat_sum: float = 0.0
    csat_count: int = 0
    last_csat: int | None = None
    last_csat_at: datetime | None = None
    # role -> user id of the current contact (champion, economic_buyer, admin)
    contacts: dict[str, str] = Field(default_factory=dict)
    # intervention outcome -> count
    responses: dict[str, int] = Field(default_factory=dict)
    health_score: float | None = None
    health_band: str | None = None
    health_components: dict[str, Any] = Field(default_factory=dict)
    engagement_score: float | None = None
    engagement_components: dict[str, Any] = Field(default_factory=dict)


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


def _fields(state: BaseModel) -> dict[str, Any]:
    """The model's field values, to write in place. The fold runs once per event and sets
    several fields each time; pydantic's assignment (no validation is configured) only adds
    bookkeeping nothing here reads (``model_fields_set``) and cost ~10 % of the fold. The values
    written are the same types the fields declare."""
    return state.__dict__


def _touch(fields: dict[str, Any], at: datetime) -> None:
    """What every event does to a user's or an account's view: widen the seen range, count."""
    if at < fields["first_seen"]:
        fields["first_seen"] = at
    if at > fields["last_seen"]:
        fields["last_seen"] = at
    if at > fields["updated_at"]:
        fields["updated_at"] = at
    fields["event_count"] += 1


def _bump(counter: dict[str, int], key: str, by: int = 1) -> None:
    counter[key] = counter.get(key, 0) + by


def _newer(at: datetime, than: datetime | None) -> bool:
    return than is None or at >= than


def _usage_area(event: Event) -> tuple[str, str] | None:
    """(feature area, event name) of a product usage event; None for other events."""
    match event:
        case TrackEvent(payload=p):
            return p.feature_area or GENERAL_AREA, p.event
        case PageEvent(payload=p):
            return p.feature_area or p.category or GENERAL_AREA, f"page:{p.name}"
    return None


def apply_event(
    account: AccountState,
    user: UserState | None,
    event: Event,
    config: ViewConfig = DEFAULT_CONFIG,
) -> list[Trigger]:
    """Fold one event into its account and (if any) user; what only both together know (daily
    active users) is counted here."""
    triggers = apply_to_account(account, event, config)
    if user is not None:
        day = windows.day_key(event.time)
        before = user.daily_usage.get(day, 0)
        triggers += apply_to_user(user, event, config)
        if before == 0 and user.daily_usage.get(day, 0) > 0:
            windows.add(account.daily_active_users, event.time, account.last_seen, config.keep_days)
    return triggers


def apply_to_user(
    user: UserState, event: Event, config: ViewConfig = DEFAULT_CONFIG
) -> list[Trigger]:
    """Fold one (not yet applied) event into the user's view; return the triggers it fires."""
    triggers: list[Trigger] = []
    at = event.time
    # The fields every event touches are written straight into the model's __dict__ (see
    # _fields); the rarer ones below go through pydantic's assignment.
    fields = _fields(user)
    if fields["account_id"] != event.account_id:
        fields["account_id"] = event.account_id
    _touch(fields, at)
    _bump(user.event_counts, event.type)
    usage = _usage_area(event)
    if usage is not None:
        triggers += _user_usage(user, event, usage, config)
    match event:
        case TrackEvent(payload=p):
            _bump(user.track_events, p.event)
            if p.feature_area:
                _bump(user.feature_usage, p.feature_area)
            if p.event == QUIZ_EVENT:
                _quiz(user, usage[0] if usage else GENERAL_AREA, p.properties.get("score"))
            if p.properties.get("milestone") and p.event not in user.milestones:
                user.milestones[p.event] = event.time.isoformat()
                triggers.append(
                    caused_by(TriggerName.MILESTONE_ACHIEVED, f"milestone {p.event}", event)
                )
        case IdentifyEvent(payload=p):
            # The newest identify wins, whatever order they arrive in.
            if _newer(event.time, user.identified_at):
                user.identified_at = event.time
                for name in ("email", "name", "timezone"):
                    value = getattr(p, name)
                    if value is not None:
                        setattr(user, name, value)
            if p.role is not None and _newer(event.time, user.role_at):
                user.role, user.role_at = p.role.value, event.time
        case NpsEvent(payload=p):
            was_detractor = user.last_nps is not None and user.last_nps <= NPS_DETRACTOR_MAX
            if _newer(event.time, user.last_nps_at):
                user.last_nps, user.last_nps_at = p.score, event.time
                if was_detractor and p.score > NPS_DETRACTOR_MAX:
                    triggers.append(
                        caused_by(TriggerName.NPS_RECOVERED, f"NPS answer {p.score}", event)
                    )
            if p.score <= NPS_DETRACTOR_MAX:
                triggers.append(
                    caused_by(TriggerName.NPS_DETRACTOR, f"NPS answer {p.score}", event)
                )
        case CsatEvent(payload=p):
            user.csat_sum += p.score
            user.csat_count += 1
            if _newer(event.time, user.last_csat_at):
                user.last_csat, user.last_csat_at = p.score, event.time
        case TicketOpenedEvent(payload=p):
            user.tickets_opened += 1
            area = p.feature_area or GENERAL_AREA
            _bump(user.support_questions, area)
            asked = at.isoformat()
            user.area_last_question[area] = max(asked, user.area_last_question.get(area, asked))
        case ResponseEvent(payload=p):
            triggers += _response(user, event, p.element_id, p.outcome)
        case ContactRoleEvent(payload=p):
            _crm_role(user, event, p.role, p.change)
        case _:
            pass
    return triggers


def _user_usage(
    user: UserState, event: Event, usage: tuple[str, str], config: ViewConfig
) -> list[Trigger]:
    area, name = usage
    triggers: list[Trigger] = []
    at = event.time
    last_active = user.last_active
    day = at.date()
    if (
        last_active is not None
        and user.daily_usage.get(windows.iso_day(day), 0) == 0
        and day >= last_active.date()
    ):
        # Coming back after a drop: as of yesterday usage was down by the threshold.
        wow = windows.week_over_week(user.daily_usage, day - timedelta(days=1))
        if wow is not None and wow <= -config.usage_drop_pct:
            triggers.append(
                caused_by(TriggerName.USAGE_RECOVERED, f"active again after {wow:.0f} %", event)
            )
    newest = at if last_active is None or at > last_active else last_active
    windows.add(user.daily_usage, at, newest, config.keep_days)
    if newest is not last_active:
        _fields(user)["last_active"] = newest
    per_area = user.area_events.setdefault(area, {})
    _bump(per_area, name)
    # Per-area days, kept for a shorter window. When the newest day moves on, every area's
    # buckets are pruned (once per person-day), not only the area used: what is kept is then
    # the same whatever order the events came in. An area ever used keeps its (maybe empty) key.
    by_area = user.area_daily_usage
    if by_area and (last_active is None or day > last_active.date()):
        for days in by_area.values():
            windows.prune(days, newest, config.area_keep_days)
    area_days = by_area.get(area)
    if area_days is None:
        area_days = by_area[area] = {}
    windows.add(area_days, at, newest, config.area_keep_days)
    return triggers


def _quiz(user: UserState, area: str, raw: object) -> None:
    if not isinstance(raw, int | float) or isinstance(raw, bool) or raw < 0:
        return
    score = raw / 100 if raw > 1 else float(raw)
    total, count = user.quiz_scores.get(area, [0.0, 0.0])
    user.quiz_scores[area] = [total + min(score, 1.0), count + 1]


def _response(user: UserState, event: Event, element: str, outcome: Outcome) -> list[Trigger]:
    assert isinstance(event, ResponseEvent)
    at = event.time.isoformat()
    triggers: list[Trigger] = []
    if outcome is Outcome.COMPLETED:
        if element not in user.achieved:
            triggers.append(
                caused_by(TriggerName.MILESTONE_ACHIEVED, f"completed {element}", event)
            )
        user.achieved[element] = min(at, user.achieved.get(element, at))
    elif outcome is Outcome.DISMISSED:
        user.dismissed[element] = max(at, user.dismissed.get(element, at))
    else:
        user.offered[element] = max(at, user.offered.get(element, at))
    entry = {
        "decision_id": event.payload.decision_id,
        "element_id": element,
        "outcome": outcome.value,
        "channel": event.payload.channel.value,
        "at": at,
    }
    history = [*user.interventions, entry]
    history.sort(key=lambda h: (h["at"], h["decision_id"], h["element_id"], h["outcome"]))
    user.interventions = history[-RECENT_INTERVENTIONS:]
    return triggers


def _crm_role(user: UserState, event: Event, role: Role, change: str) -> None:
    roles = set(user.crm_roles)
    newest = _newer(event.time, user.role_at)
    if change == "assigned":
        roles.add(role.value)
        if newest:
            user.role, user.role_at = role.value, event.time
    else:
        roles.discard(role.value)
        if user.role == role.value and newest:
            user.role, user.role_at = Role.END_USER.value, event.time
        if change == "left":
            user.left_at = max(user.left_at or event.time, event.time)
    user.crm_roles = sorted(roles)


def apply_to_account(
    account: AccountState, event: Event, config: ViewConfig = DEFAULT_CONFIG
) -> list[Trigger]:
    triggers: list[Trigger] = []
    at = event.time
    _touch(_fields(account), at)
    usage = _usage_area(event)
    if usage is not None:
        area = usage[0]
        windows.add(account.daily_usage, at, account.last_seen, config.keep_days)
        _bump(account.feature_usage, area)
        day = windows.day_key(at)
        account.area_last_used[area] = max(day, account.area_last_used.get(area, day))
        return triggers  # product usage is nothing else to the account
    match event:
        case SubscriptionEvent():
            triggers += _subscription(account, event)
        case PaymentFailedEvent(payload=p):
            account.payment_failures += 1
            account.last_payment_failed_at = max(
                account.last_payment_failed_at or event.time, event.time
            )
            triggers.append(
                caused_by(
                    TriggerName.PAYMENT_FAILED,
                    f"payment of invoice {p.invoice_id} failed (attempt {p.attempt_count})",
                    event,
                )
            )
        case InvoicePaidEvent():
            account.invoices_paid += 1
            account.last_invoice_paid_at = max(
                account.last_invoice_paid_at or event.time, event.time
            )
        case TicketOpenedEvent(payload=p):
            if p.ticket_id not in account.solved_tickets:
                account.open_tickets[p.ticket_id] = p.priority
            account.tickets_total += 1
            before = windows.total(account.tickets_daily, event.time.date(), 7)
            windows.add(account.tickets_daily, event.time, account.last_seen, config.keep_days)
            after = windows.total(account.tickets_daily, event.time.date(), 7)
            if before < config.ticket_spike_7d <= after:
                triggers.append(
                    caused_by(TriggerName.TICKET_SPIKE, f"{after} tickets opened in 7 days", event)
                )
        case TicketUpdatedEvent(payload=p):
            if p.ticket_id in account.open_tickets:
                account.open_tickets[p.ticket_id] = p.priority
        case TicketSolvedEvent(payload=p):
            account.open_tickets.pop(p.ticket_id, None)
            solved = at.isoformat()
            account.solved_tickets[p.ticket_id] = max(
                solved, account.solved_tickets.get(p.ticket_id, solved)
            )
        case NpsEvent(payload=p):
            if _newer(event.time, account.last_nps_at):
                account.last_nps, account.last_nps_at = p.score, event.time
        case CsatEvent(payload=p):
            account.csat_sum += p.score
            account.csat_count += 1
            if _newer(event.time, account.last_csat_at):
                account.last_csat, account.last_csat_at = p.score, event.time
        case GroupEvent(payload=p):
            if p.name:
                account.name = p.name
            if p.plan and account.plan is None:
                account.plan = p.plan
        case ResponseEvent(payload=p):
            _bump(account.responses, p.outcome.value)
        case ContactRoleEvent(payload=p):
            triggers += _contact(account, event, p.role, p.change)
        case _:
            pass
    return triggers


def _subscription(account: AccountState, event: SubscriptionEvent) -> list[Trigger]:
    p = event.payload
    triggers: list[Trigger] = []
    if not _newer(event.time, account.billing_updated_at):
        return triggers  # an older state of the subscription, arrived late
    was_paying = account.subscription_status in PAYING
    previous = account.subscription_status
    account.billing_updated_at = event.time
    account.plan = p.plan
    account.subscription_status = p.status
    account.mrr = p.mrr
    account.renewal_date = p.renewal_date
    account.subscription_id = p.subscription_id or account.subscription_id
    account.customer_id = p.customer_id or account.customer_id
    if p.status == "active" and not was_paying:
        account.contract_signed_at = min(account.contract_signed_at or event.time, event.time)
        triggers.append(caused_by(TriggerName.CONTRACT_SIGNED, f"subscription to {p.plan}", event))
    elif p.status == "past_due" and previous != "past_due":
        failed = account.last_payment_failed_at
        if failed is None or event.time - failed > SAME_FAILURE:
            triggers.append(caused_by(TriggerName.PAYMENT_FAILED, "subscription past due", event))
    return triggers


def _contact(account: AccountState, event: Event, role: Role, change: str) -> list[Trigger]:
    assert event.user_id is not None
    key = role.value
    current = account.contacts.get(key)
    triggers: list[Trigger] = []
    if change == "assigned":
        account.contacts[key] = event.user_id
        if role is Role.CHAMPION and current is not None and current != event.user_id:
            triggers.append(
                caused_by(
                    TriggerName.CHAMPION_CHANGED,
                    f"champion {current} replaced by {event.user_id}",
                    event,
                )
            )
    elif current == event.user_id:
        del account.contacts[key]
        if role is Role.CHAMPION:
            verb = "left the company" if change == "left" else "is no longer champion"
            triggers.append(
                caused_by(TriggerName.CHAMPION_CHANGED, f"champion {current} {verb}", event)
            )
    return triggers


def refresh_scores(
    account: AccountState, cause: Event | None, config: ViewConfig = DEFAULT_CONFIG
) -> list[Trigger]:
    """Recompute health and engagement as of the newest event; trigger on a band change."""
    as_of = account.last_seen
    score, components = scores.health_figures(account, as_of, config.health_weights)
    band = scores.band(score, config.health_red_below, config.health_green_from)
    e_score, e_components = scores.engagement_figures(account, as_of, config.engagement_weights)
    previous = account.health_band
    account.health_score, account.health_band = score, band
    account.health_components = components
    account.engagement_score = e_score
    account.engagement_components = e_components
    if cause is None or previous is None or previous == band or band == "yellow":
        return []
    name = TriggerName.HEALTH_RED if band == "red" else TriggerName.HEALTH_GREEN
    worst_name, worst = min(components.items(), key=lambda kv: kv[1]["value"])
    reason = f"health {score:.0f} ({previous} → {band}); weakest: {worst_name}: {worst['reason']}"
    trigger = caused_by(name, reason, cause)
    return [trigger.model_copy(update={"user_id": None})]
