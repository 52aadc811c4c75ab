"""Account health and engagement scores, with their components exposed.

Each score is a weighted mean of components in [0, 1], scaled to 0–100. The weights come from
settings (``NBV_HEALTH_WEIGHTS``, ``NBV_ENGAGEMENT_WEIGHTS``); a component missing from the
weights is left out. Every component carries a short human reason, so a CSM sees *why* an
account is red. Formulas and targets are documented in docs/ingest.md.

The projector recomputes both scores for every account a batch touches, so the figures are built
as plain dicts (``health_figures`` / ``engagement_figures``, what the view stores); the pydantic
``Score`` is made from them only where it is served.
"""

from __future__ import annotations

import math
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from services.ingest import windows

if TYPE_CHECKING:
    from services.ingest.view import AccountState

Band = Literal["red", "yellow", "green"]

# Targets at which a component reaches 1.0 (the levels of a healthy account).
TARGET_FEATURE_AREAS = 5
TARGET_EVENTS_PER_USER_28D = 40
TARGET_DAU_RATIO = 0.5
TARGET_ACTIVE_DAYS_28D = 20
NEUTRAL = 0.5
PAYMENT_LOOKBACK = timedelta(days=90)
PRIORITY_RANK = {"low": 0, "normal": 1, "high": 2, "urgent": 3}


class Component(BaseModel):
    value: float
    weight: float
    reason: str


class Score(BaseModel):
    score: float
    band: Band | None = None
    components: dict[str, Component]


def _clamp(x: float) -> float:
    return max(0.0, min(1.0, x))


Figures = tuple[float, dict[str, dict[str, Any]]]


def _combine(parts: dict[str, tuple[float, str]], weights: dict[str, float]) -> Figures:
    """The weighted score and its components, as stored (each as ``Component`` dumps it)."""
    kept = [
        (name, round(float(_clamp(v)), 4), float(weights[name]), why)
        for name, (v, why) in parts.items()
        if weights.get(name, 0) > 0
    ]
    total = sum(weight for _, _, weight, _ in kept)
    weighted = sum(value * weight for _, value, weight, _ in kept)
    score = 100.0 * weighted / total if total else 0.0
    components: dict[str, dict[str, Any]] = {
        name: {"value": value, "weight": weight, "reason": why} for name, value, weight, why in kept
    }
    return round(score, 2), components


def to_score(figures: Figures, band: Band | None = None) -> Score:
    score, components = figures
    return Score.model_validate({"score": score, "band": band, "components": components})


def band(score: float, red_below: float, green_from: float) -> Band:
    if score < red_below:
        return "red"
    return "green" if score >= green_from else "yellow"


def health(
    account: AccountState,
    as_of: datetime,
    weights: dict[str, float],
    red_below: float,
    green_from: float,
) -> Score:
    figures = health_figures(account, as_of, weights)
    return to_score(figures, band(figures[0], red_below, green_from))


def health_figures(account: AccountState, as_of: datetime, weights: dict[str, float]) -> Figures:
    today = as_of.date()
    since = windows.iso_day(_ago(today, 27))
    areas = [a for a, day in account.area_last_used.items() if day >= since]
    events_28d = windows.total(account.daily_usage, today, 28)
    per_user = events_28d / max(1, account.user_count)
    open_high = sum(1 for p in account.open_tickets.values() if PRIORITY_RANK.get(p, 1) >= 2)
    tickets_30d = windows.total(account.tickets_daily, today, 30)
    parts = {
        "usage_breadth": (
            len(areas) / TARGET_FEATURE_AREAS,
            f"{len(areas)} feature area(s) used in 28 days (target {TARGET_FEATURE_AREAS})",
        ),
        "usage_depth": (
            math.log1p(per_user) / math.log1p(TARGET_EVENTS_PER_USER_28D),
            f"{per_user:.1f} events per user in 28 days (target {TARGET_EVENTS_PER_USER_28D})",
        ),
        "payment": _payment(account, as_of),
        "support": (
            1.0 - 0.1 * len(account.open_tickets) - 0.15 * open_high - 0.05 * tickets_30d,
            f"{len(account.open_tickets)} open ticket(s), {open_high} high/urgent, "
            f"{tickets_30d} opened in 30 days",
        ),
        "sentiment": _sentiment(account),
    }
    return _combine(parts, weights)


def engagement(account: AccountState, as_of: datetime, weights: dict[str, float]) -> Score:
    return to_score(engagement_figures(account, as_of, weights))


def engagement_figures(
    account: AccountState, as_of: datetime, weights: dict[str, float]
) -> Figures:
    today = as_of.date()
    dau = windows.total(account.daily_active_users, today, 7) / 7
    ratio = dau / max(1, account.user_count)
    days = windows.active_days(account.daily_usage, today, 28)
    wow = windows.week_over_week(account.daily_usage, today)
    shown = sum(account.responses.values())
    acted = account.responses.get("clicked", 0) + account.responses.get("completed", 0)
    parts = {
        "active_users": (
            ratio / TARGET_DAU_RATIO,
            f"{dau:.1f} daily active of {account.user_count} user(s) over 7 days",
        ),
        "active_days": (
            days / TARGET_ACTIVE_DAYS_28D,
            f"active on {days} of the last 28 days (target {TARGET_ACTIVE_DAYS_28D})",
        ),
        "trend": (
            NEUTRAL if wow is None else NEUTRAL + wow / 200,
            "no previous week to compare" if wow is None else f"usage {wow:+.0f} % week over week",
        ),
        "responsiveness": (
            NEUTRAL if shown == 0 else acted / shown,
            "no responses to interventions yet"
            if shown == 0
            else f"{acted} of {shown} intervention response(s) clicked or completed",
        ),
    }
    return _combine(parts, weights)


def _ago(today: date, days: int) -> date:
    return today - timedelta(days=days)


def _payment(account: AccountState, as_of: datetime) -> tuple[float, str]:
    status = account.subscription_status
    if status is None:
        return NEUTRAL, "no billing information"
    if status in ("canceled", "incomplete_expired"):
        return 0.0, f"subscription {status}"
    if status in ("past_due", "unpaid"):
        return 0.2, f"subscription {status}"
    failed = account.last_payment_failed_at
    if failed is not None and as_of - failed <= PAYMENT_LOOKBACK:
        paid = account.last_invoice_paid_at
        if paid is not None and paid > failed:
            return 0.7, "a payment failed in the last 90 days, since paid"
        return 0.4, "a payment failed in the last 90 days"
    return 1.0, f"subscription {status}, payments on time"


def _sentiment(account: AccountState) -> tuple[float, str]:
    parts: list[float] = []
    reasons: list[str] = []
    if account.last_nps is not None:
        parts.append(account.last_nps / 10)
        reasons.append(f"last NPS {account.last_nps}")
    if account.csat_count:
        avg = account.csat_sum / account.csat_count
        parts.append((avg - 1) / 4)
        reasons.append(f"CSAT average {avg:.1f}/5")
    if not parts:
        return NEUTRAL, "no NPS or CSAT answers yet"
    return sum(parts) / len(parts), ", ".join(reasons)
