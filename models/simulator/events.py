"""What the simulated world emits, as the JSON events the ingest API accepts.

Event ids are derived from the seed, the week and the person, so a re-run (or a retried POST)
sends the same ids and the system deduplicates them. Events built without a time are stamped by
the driver when it sends them (the simulation clock's "now"); the first sighting of an account,
its people and their recent product usage is backdated to their simulated tenure, the way NBV
installed on an existing product is backfilled (``nbv ingest``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from models.features import AREAS
from models.simulator.world import RELEVANCE, Account, Person, milestones_reached, new_person

# How a person's sessions spread over the week, Monday first.
WEEKDAYS = (1.0, 1.0, 1.0, 1.0, 0.9, 0.15, 0.1)

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
    event_id: str,
    type_: str,
    account_id: str,
    payload: Json,
    *,
    user_id: str | None,
    at: datetime | None = None,
) -> Json:
    out: Json = {
        "id": event_id,
        "source": "simulator",
        "type": type_,
        "account_id": account_id,
        "payload": payload,
    }
    if at is not None:
        out["time"] = iso(at)
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


def onboarding_events(
    acct: Account, seed: int, now: datetime, milestones: Sequence[tuple[str, str, str]] = ()
) -> list[Json]:
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
    rng = random.Random(f"backfill:{seed}:{acct.account_id}")
    for p in acct.people:
        events.extend(person_joined(p, seed, now, "join"))
        events.extend(usage_backfill(p, seed, now, rng, milestones))
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


@dataclass(frozen=True)
class WeekPlan:
    """One person's week: what the world sends about them at its start (support, surveys),
    and their sessions in the product, each on a day of the week with its product events."""

    background: list[Json]
    sessions: list[tuple[int, list[Json]]]


def _usage_weights(p: Person) -> list[float]:
    # People use what their job needs, the more so the better they are at it; a project under
    # way sends them into its area, struggling or not.
    return [
        RELEVANCE[p.role].get(a, 0.03) * (0.15 + p.sophistication[a])
        + (0.6 if a in p.projects else 0.0)
        for a in AREAS
    ]


def _track(event_id: str, p: Person, area: str, rng: random.Random, at: datetime | None) -> Json:
    return _event(
        event_id,
        "product.track",
        p.account_id,
        {"event": rng.choice(AREA_EVENTS[area]), "feature_area": area},
        user_id=p.user_id,
        at=at,
    )


def milestone_events(p: Person, events: Sequence[str], tag: str, at: datetime | None) -> list[Json]:
    """Product milestones the person reached by themselves (the events that mark elements
    achieved, e.g. ``project_created``)."""
    return [
        _event(
            f"{p.user_id}-{tag}-{event}",
            "product.track",
            p.account_id,
            {"event": event},
            user_id=p.user_id,
            at=at,
        )
        for event in events
    ]


def usage_backfill(
    p: Person,
    seed: int,
    now: datetime,
    rng: random.Random,
    milestones: Sequence[tuple[str, str, str]] = (),
) -> list[Json]:
    """The product usage of the last weeks before NBV was installed, backdated, with the
    milestones the person had reached by then."""
    weeks = min(p.tenure_weeks, 4)
    weights = _usage_weights(p)
    count = _poisson(rng, p.activity * weeks * 4.0)
    reached = milestones_reached(rng, p, milestones) if p.tenure_weeks >= 2 else []
    since = now - timedelta(weeks=p.tenure_weeks)
    return milestone_events(p, reached, f"sim{seed}-backfill", since + (now - since) / 2) + [
        _track(
            f"sim{seed}-{p.user_id}-backfill-e{n}",
            p,
            rng.choices(AREAS, weights=weights)[0],
            rng,
            now - timedelta(days=rng.uniform(1.0, 7.0 * weeks)),
        )
        for n in range(count)
    ]


def person_week(p: Person, seed: int, week: int, rng: random.Random) -> WeekPlan:
    sessions: list[tuple[int, list[Json]]] = []
    weights = _usage_weights(p)
    for s in range(_poisson(rng, p.activity * (1.0 + 0.4 * p.satisfaction))):
        day = rng.choices(range(7), weights=WEEKDAYS)[0]
        events = [
            _track(
                f"sim{seed}-{p.user_id}-w{week}-s{s}-e{n}",
                p,
                rng.choices(AREAS, weights=weights)[0],
                rng,
                None,
            )
            for n in range(rng.randint(2, 6))
        ]
        sessions.append((day, events))
    sessions.sort(key=lambda s: s[0])
    background: list[Json] = []
    # Last weeks' tickets get solved; struggling where the job needs it opens new ones.
    for ticket in list(p.tickets):
        if rng.random() < 0.6:
            p.tickets.remove(ticket)
            background.append(
                _event(
                    f"sim{seed}-{p.user_id}-w{week}-solved-{ticket}",
                    "support.ticket_solved",
                    p.account_id,
                    {"ticket_id": ticket},
                    user_id=p.user_id,
                )
            )
    for area in AREAS:
        chance = 0.1 * p.need[area] * RELEVANCE[p.role].get(area, 0.0)
        if area in p.projects:
            chance += 0.5
        if rng.random() < chance:
            ticket = f"t-{p.user_id}-{week}-{area}"
            p.tickets.append(ticket)
            background.append(
                _event(
                    f"sim{seed}-{p.user_id}-w{week}-ticket-{area}",
                    "support.ticket_opened",
                    p.account_id,
                    {
                        "ticket_id": ticket,
                        "priority": "high" if p.need[area] > 0.7 else "normal",
                        "feature_area": area,
                    },
                    user_id=p.user_id,
                )
            )
    if rng.random() < 0.08:
        score = int(max(0, min(10, round(7.5 + 3.5 * p.satisfaction + rng.gauss(0, 1.2)))))
        background.append(
            _event(
                f"sim{seed}-{p.user_id}-w{week}-nps",
                "survey.nps",
                p.account_id,
                {"score": score},
                user_id=p.user_id,
            )
        )
    return WeekPlan(background, sessions)


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


def new_hire(acct: Account, seed: int, week: int, now: datetime, rng: random.Random) -> list[Json]:
    """The account adds a seat: someone new, with everything still to learn."""
    acct.hired += 1
    role = "admin" if rng.random() < 0.1 else "end_user"
    user_id = f"{acct.account_id}-w{week}-hire{acct.hired}"
    person = new_person(rng, user_id, acct.account_id, role, 0)
    acct.people.append(person)
    return person_joined(person, seed, now, f"w{week}")
