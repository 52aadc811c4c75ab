"""What the simulated world emits each week, as the JSON events the ingest API accepts.

Event ids are derived from the seed, the week and the person, so a re-run (or a retried POST)
sends the same ids and the system deduplicates them. Times are the wall clock when sent, except
the first sighting of an account and its people, which is backdated to their simulated tenure so
that the system's tenure features differ between old and new customers: the decision service
decides "now", so compressing weeks into minutes keeps every other clock consistent with it.
"""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from models.simulator.world import AREAS, RELEVANCE, Account, Person, new_person

# A few product events per area, as a real tracking plan would name them.
AREA_EVENTS: dict[str, tuple[str, ...]] = {
    "core": ("task_created", "task_completed", "project_viewed", "my_work_viewed"),
    "integrations": ("integration_synced", "integration_viewed"),
    "automation": ("automation_run", "automation_edited"),
    "reporting": ("dashboard_viewed", "report_exported"),
    "admin": ("member_role_changed", "admin_console_viewed"),
    "api": ("api_call", "api_token_used"),
    "collaboration": ("comment_created", "mention_created", "file_shared"),
    "billing": ("invoice_viewed", "plan_page_viewed"),
}

Json = dict[str, Any]


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat()


def _event(
    event_id: str, type_: str, account_id: str, payload: Json, *, user_id: str | None, at: datetime
) -> Json:
    out: Json = {
        "id": event_id,
        "source": "simulator",
        "type": type_,
        "time": iso(at),
        "account_id": account_id,
        "payload": payload,
    }
    if user_id is not None:
        out["user_id"] = user_id
    return out


def _poisson(rng: random.Random, mean: float) -> int:
    # Knuth's method: the means here are small (a few sessions a week).
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def onboarding_events(acct: Account, seed: int, now: datetime) -> list[Json]:
    """The account and its people as the system first sees them (backdated to their tenure)."""
    since = now - timedelta(weeks=acct.age_weeks)
    events = [
        _event(
            f"sim{seed}-{acct.account_id}-group",
            "account.group",
            acct.account_id,
            {"name": acct.name, "plan": acct.plan, "traits": {"size": len(acct.people)}},
            user_id=None,
            at=since,
        )
    ]
    for p in acct.people:
        events.extend(person_joined(p, seed, now, "join"))
    return events


def person_joined(p: Person, seed: int, now: datetime, tag: str) -> list[Json]:
    at = now - timedelta(weeks=p.tenure_weeks, hours=1)
    events = [
        _event(
            f"sim{seed}-{p.user_id}-{tag}-identify",
            "user.identify",
            p.account_id,
            {"email": f"{p.user_id}@example.com", "role": p.role, "timezone": "UTC"},
            user_id=p.user_id,
            at=at,
        )
    ]
    if p.role == "champion":
        events.append(
            _event(
                f"sim{seed}-{p.user_id}-{tag}-crm",
                "crm.contact_role",
                p.account_id,
                {"role": "champion", "change": "assigned"},
                user_id=p.user_id,
                at=at,
            )
        )
    return events


def billing_events(
    acct: Account, seed: int, week: int, now: datetime, rng: random.Random
) -> list[Json]:
    weeks_left = acct.renewal_week - week
    status = "canceled" if acct.churned else "active"
    events = [
        _event(
            f"sim{seed}-{acct.account_id}-w{week}-sub",
            "billing.subscription_updated",
            acct.account_id,
            {
                "plan": acct.plan,
                "status": status,
                "mrr": 0.0 if acct.churned else acct.mrr,
                "renewal_date": iso(now + timedelta(weeks=max(weeks_left, 0), days=1)),
                "subscription_id": f"sub-{acct.account_id}",
            },
            user_id=None,
            at=now,
        )
    ]
    if not acct.churned and week % 4 == 0:
        failed = rng.random() < 0.06
        events.append(
            _event(
                f"sim{seed}-{acct.account_id}-w{week}-invoice",
                "billing.payment_failed" if failed else "billing.invoice_paid",
                acct.account_id,
                {
                    "invoice_id": f"in-{acct.account_id}-{week}",
                    "amount": acct.mrr,
                    "attempt_count": 1,
                },
                user_id=None,
                at=now,
            )
        )
    return events


def person_week_events(
    p: Person, seed: int, week: int, now: datetime, rng: random.Random
) -> tuple[list[Json], int]:
    """Background activity of one person for one week, and how many sessions they will have
    (each session asks NBV for a card)."""
    events: list[Json] = []
    sessions = _poisson(rng, p.activity * (1.0 + 0.4 * p.satisfaction))
    weights = [RELEVANCE[p.role].get(a, 0.05) * (0.15 + p.sophistication[a]) for a in AREAS]
    for s in range(sessions):
        for n in range(rng.randint(2, 6)):
            area = rng.choices(AREAS, weights=weights)[0]
            events.append(
                _event(
                    f"sim{seed}-{p.user_id}-w{week}-s{s}-e{n}",
                    "product.track",
                    p.account_id,
                    {"event": rng.choice(AREA_EVENTS[area]), "feature_area": area},
                    user_id=p.user_id,
                    at=now,
                )
            )
    # Struggling in an area the job needs: a support ticket about it.
    area = max(AREAS, key=lambda a: p.need[a])
    if rng.random() < 0.25 * p.need[area]:
        events.append(
            _event(
                f"sim{seed}-{p.user_id}-w{week}-ticket",
                "support.ticket_opened",
                p.account_id,
                {
                    "ticket_id": f"t-{p.user_id}-{week}",
                    "priority": "high" if p.need[area] > 0.7 else "normal",
                    "feature_area": area,
                },
                user_id=p.user_id,
                at=now,
            )
        )
    if rng.random() < 0.5:
        # Last week's ticket (if any) gets solved: ids that were never opened are harmless.
        events.append(
            _event(
                f"sim{seed}-{p.user_id}-w{week}-solved",
                "support.ticket_solved",
                p.account_id,
                {"ticket_id": f"t-{p.user_id}-{week - 1}"},
                user_id=p.user_id,
                at=now,
            )
        )
    if rng.random() < 0.08:
        score = int(max(0, min(10, round(7.5 + 3.5 * p.satisfaction + rng.gauss(0, 1.2)))))
        events.append(
            _event(
                f"sim{seed}-{p.user_id}-w{week}-nps",
                "survey.nps",
                p.account_id,
                {"score": score},
                user_id=p.user_id,
                at=now,
            )
        )
    return events, sessions


def champion_change(
    acct: Account, seed: int, week: int, now: datetime, rng: random.Random
) -> list[Json]:
    """The champion leaves and someone new takes over (with everything still to learn)."""
    old = next((p for p in acct.people if p.role == "champion" and p.active), None)
    if old is None:
        return []
    old.active = False
    new = new_person(rng, f"{acct.account_id}-w{week}-champion", acct.account_id, "champion", 0)
    acct.people.append(new)
    events = [
        _event(
            f"sim{seed}-{old.user_id}-w{week}-left",
            "crm.contact_role",
            acct.account_id,
            {"role": "champion", "change": "left"},
            user_id=old.user_id,
            at=now,
        )
    ]
    return events + person_joined(new, seed, now, f"w{week}")
