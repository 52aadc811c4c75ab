"""The full customer view: windows, late events, order independence, crossings, summaries."""

from __future__ import annotations

import random
from datetime import timedelta

from services.ingest import windows
from services.ingest.summary import account_summary, pending, sophistication, user_summary
from services.ingest.view import (
    DEFAULT_CONFIG,
    AccountState,
    UserState,
    ViewConfig,
    apply_event,
    new_account,
    new_user,
    refresh_scores,
)
from shared.envelope import Event
from tests.factories import T0, event


def fold(events: list[Event], config: ViewConfig = DEFAULT_CONFIG):
    users: dict[str, UserState] = {}
    accounts: dict[str, AccountState] = {}
    triggers = []
    for e in events:
        account = accounts.setdefault(e.account_id, new_account(e))
        user = None
        if e.user_id:
            if e.user_id not in users:
                users[e.user_id] = new_user(e)
                account.user_count += 1
            user = users[e.user_id]
        triggers += apply_event(account, user, e, config)
    return users, accounts, triggers


def track(day: float, area: str = "core", name: str = "task_done", **kw) -> Event:
    return event(
        "product.track",
        {"event": name, "feature_area": area},
        at=T0 + timedelta(days=day),
        **kw,
    )


def test_daily_buckets_give_exact_windows_and_week_over_week() -> None:
    # 10 events a day in week one, 4 a day in week two.
    events = [track(d + i / 100) for d in range(7) for i in range(10)]
    events += [track(7 + d + i / 100) for d in range(7) for i in range(4)]
    users, _, _ = fold(events)
    daily = users["u1"].daily_usage
    end = (T0 + timedelta(days=13)).date()
    assert windows.total(daily, end, 1) == 4
    assert windows.total(daily, end, 7) == 28
    assert windows.total(daily, end, 28) == 98
    assert windows.active_days(daily, end, 28) == 14
    assert windows.week_over_week(daily, end) == -60.0


def test_a_late_event_lands_in_its_own_day() -> None:
    users, accounts, _ = fold([track(0), track(5), track(1.5)])  # day 1 arrives after day 5
    assert users["u1"].daily_usage == {"2026-11-01": 1, "2026-11-02": 1, "2026-11-06": 1}
    assert accounts["acme"].daily_active_users == {
        "2026-11-01": 1,
        "2026-11-02": 1,
        "2026-11-06": 1,
    }


def test_events_older_than_the_retention_are_not_bucketed() -> None:
    config = ViewConfig(max_lateness=timedelta(days=1))
    keep = config.keep_days
    users, _, _ = fold([track(100), track(100 - keep - 1), track(100 - keep + 1)], config)
    days = sorted(users["u1"].daily_usage)
    assert len(days) == 2 and users["u1"].event_count == 3


def test_the_view_does_not_depend_on_arrival_order() -> None:
    rng = random.Random(3)
    events = [
        track(rng.uniform(0, 40), rng.choice(["core", "reporting"]), user=f"u{rng.randrange(4)}")
        for _ in range(300)
    ]
    events += [
        event(
            "survey.nps", {"score": rng.randrange(11)}, at=T0 + timedelta(days=rng.uniform(0, 40))
        )
        for _ in range(10)
    ]
    users_a, accounts_a, _ = fold(sorted(events, key=lambda e: e.time))
    shuffled = events[:]
    rng.shuffle(shuffled)
    users_b, accounts_b, _ = fold(shuffled)
    for u in users_a:
        a, b = users_a[u].model_dump(), users_b[u].model_dump()
        # Counter dicts keep insertion order; compare their content.
        assert a == b
    assert accounts_a["acme"].daily_usage == accounts_b["acme"].daily_usage
    assert accounts_a["acme"].daily_active_users == accounts_b["acme"].daily_active_users
    assert accounts_a["acme"].last_nps == accounts_b["acme"].last_nps


def test_usage_recovered_after_a_drop() -> None:
    events = [track(d + i / 100) for d in range(7) for i in range(5)]
    # Then nothing for a week; coming back on day 15 is a recovery.
    _, _, triggers = fold([*events, track(15)])
    assert [t.name for t in triggers] == ["usage_recovered"]


def test_nps_detractor_then_recovered() -> None:
    _, _, triggers = fold(
        [
            event("survey.nps", {"score": 3}),
            event("survey.nps", {"score": 9}, minutes=5),
        ]
    )
    assert [t.name for t in triggers] == ["nps_detractor", "nps_recovered"]


def test_champion_change_and_champion_leaving() -> None:
    role = "crm.contact_role"
    users, accounts, triggers = fold(
        [
            event(role, {"role": "champion"}, user="ana"),
            event(role, {"role": "champion"}, user="bo", minutes=1),
            event(role, {"role": "champion", "change": "left"}, user="bo", minutes=2),
        ]
    )
    assert [t.name for t in triggers] == ["champion_changed", "champion_changed"]
    assert "ana replaced by bo" in triggers[0].reason and "left" in triggers[1].reason
    assert accounts["acme"].contacts == {}
    assert users["bo"].left_at is not None and users["bo"].role == "end_user"


def test_ticket_spike_fires_on_the_crossing_only() -> None:
    opened = [
        event("support.ticket_opened", {"ticket_id": f"t{i}", "priority": "high"}, minutes=i)
        for i in range(5)
    ]
    _, accounts, triggers = fold(opened)
    assert [t.name for t in triggers] == ["ticket_spike"]
    assert "3 tickets" in triggers[0].reason
    assert accounts["acme"].tickets_total == 5


def test_a_solved_ticket_is_not_reopened_by_a_late_update() -> None:
    _, accounts, _ = fold(
        [
            event("support.ticket_opened", {"ticket_id": "t1"}),
            event("support.ticket_solved", {"ticket_id": "t1"}, minutes=10),
            event("support.ticket_updated", {"ticket_id": "t1", "priority": "urgent"}, minutes=5),
        ]
    )
    assert accounts["acme"].open_tickets == {}


def test_billing_payment_failure_and_stale_subscription_state() -> None:
    sub = "billing.subscription_updated"
    _, accounts, triggers = fold(
        [
            event(sub, {"plan": "pro", "mrr": 500}, user=None),
            event("billing.payment_failed", {"invoice_id": "in_1", "attempt_count": 1}, minutes=1),
            event(sub, {"plan": "pro", "status": "past_due"}, user=None, minutes=2),
            # An older state arriving late changes nothing.
            event(sub, {"plan": "starter", "mrr": 10}, user=None, minutes=-5),
        ]
    )
    account = accounts["acme"]
    assert [t.name for t in triggers] == ["contract_signed", "payment_failed"]
    assert account.plan == "pro" and account.subscription_status == "past_due"
    assert account.payment_failures == 1 and account.contract_signed_at is not None


def test_interventions_pending_achieved_dismissed_snoozed() -> None:
    def resp(element: str, outcome: str, minutes: float) -> Event:
        return event(
            "nbv.response",
            {"decision_id": "d1", "element_id": element, "outcome": outcome},
            minutes=minutes,
        )

    users, accounts, triggers = fold(
        [
            resp("tour", "shown", 0),
            resp("tour", "completed", 1),
            resp("webinar", "shown", 2),
            resp("webinar", "dismissed", 3),
            resp("guide", "snoozed", 4),
            resp("quiz", "clicked", 5),
        ]
    )
    user = users["u1"]
    assert pending(user) == ["guide", "quiz"]
    assert list(user.achieved) == ["tour"] and list(user.dismissed) == ["webinar"]
    assert [h["outcome"] for h in user.interventions] == [
        "shown",
        "completed",
        "shown",
        "dismissed",
        "snoozed",
        "clicked",
    ]
    assert [t.name for t in triggers] == ["milestone_achieved"]
    assert accounts["acme"].responses["shown"] == 2


def test_sophistication_per_area_uses_breadth_depth_quiz_and_questions() -> None:
    names = ["a", "b", "c", "d", "e"]
    events = [track(i / 50, "reporting", names[i % 5]) for i in range(60)]
    events.append(
        event(
            "product.track",
            {"event": "quiz_completed", "feature_area": "reporting", "properties": {"score": 90}},
            at=T0 + timedelta(days=2),
        )
    )
    events += [track(0.1, "automation")]
    events += [
        event("support.ticket_opened", {"ticket_id": f"t{i}", "feature_area": "automation"})
        for i in range(3)
    ]
    users, _, _ = fold(events)
    levels = sophistication(users["u1"])
    assert levels["reporting"].level == "expert" and levels["reporting"].quiz == 0.9
    assert levels["automation"].level == "novice"
    assert levels["automation"].support_questions == 3


def test_health_components_and_band_crossings() -> None:
    sub = "billing.subscription_updated"
    events = [event(sub, {"plan": "pro", "mrr": 900}, user=None)]
    areas = ["core", "reporting", "automation", "admin", "collaboration"]
    events += [track(d / 4, areas[d % 5], user=f"u{d % 3}") for d in range(120)]
    events.append(event("survey.nps", {"score": 10}, at=T0 + timedelta(days=29)))
    _, accounts, _ = fold(events)
    account = accounts["acme"]
    assert refresh_scores(account, events[-1]) == []  # first score: no crossing yet
    assert account.health_band == "green", account.health_components
    assert set(account.health_components) == {
        "usage_breadth",
        "usage_depth",
        "payment",
        "support",
        "sentiment",
    }
    bad = [
        event(sub, {"plan": "pro", "status": "canceled"}, user=None, at=T0 + timedelta(days=60)),
        event("survey.nps", {"score": 0}, at=T0 + timedelta(days=60)),
        *[
            event(
                "support.ticket_opened",
                {"ticket_id": f"t{i}", "priority": "urgent"},
                at=T0 + timedelta(days=60),
            )
            for i in range(4)
        ],
    ]
    for e in bad:
        apply_event(account, None, e)
    triggers = refresh_scores(account, bad[-1])
    assert [t.name for t in triggers] == ["health_red"]
    assert "weakest" in triggers[0].reason and triggers[0].user_id is None
    assert account.health_components["payment"]["value"] == 0.0


def test_weights_are_configurable() -> None:
    events = [track(0)]
    _, accounts, _ = fold(events)
    config = ViewConfig(health_weights={"support": 1.0})
    refresh_scores(accounts["acme"], None, config)
    assert list(accounts["acme"].health_components) == ["support"]
    assert accounts["acme"].health_score == 100.0


def test_summaries_read_as_of_now() -> None:
    sub = "billing.subscription_updated"
    renewal = T0 + timedelta(days=90)
    users, accounts, _ = fold(
        [
            event(sub, {"plan": "pro", "renewal_date": renewal.isoformat()}, user=None),
            track(0),
            track(1),
            event("support.ticket_opened", {"ticket_id": "t1", "priority": "high"}),
            event("survey.csat", {"score": 4}),
        ]
    )
    now = T0 + timedelta(days=10)
    u = user_summary(users["u1"], now)
    assert u.usage.events_7d == 0 and u.usage.events_28d == 2 and u.tenure_days == 10
    assert u.csat_average == 4.0
    a = account_summary(accounts["acme"], now, DEFAULT_CONFIG)
    assert a.days_to_renewal == 80 and a.worst_open_priority == "high"
    assert a.tickets_30d == 1 and a.open_tickets == 1
    assert a.health.components["support"].value < 1.0


def test_per_area_recency_counts_days_by_area_and_the_newest_question() -> None:
    events = [track(d + i / 100, "reporting") for d in range(7) for i in range(3)]
    events += [track(7 + d + i / 100, "reporting") for d in range(7) for i in range(1)]
    events += [track(10 + i / 100, "automation") for i in range(5)]
    events += [
        event("support.ticket_opened", {"ticket_id": "t2", "feature_area": "automation"}, at=at)
        for at in (T0 + timedelta(days=9), T0 + timedelta(days=4))  # the older one arrives late
    ]
    events.append(event("support.ticket_opened", {"ticket_id": "t3"}, at=T0))
    users, _, _ = fold(events)
    user = users["u1"]
    end = (T0 + timedelta(days=13)).date()
    reporting = user.area_daily_usage["reporting"]
    assert windows.total(reporting, end, 7) == 7
    assert windows.total(reporting, end - timedelta(days=7), 7) == 21
    assert windows.total(user.area_daily_usage["automation"], end, 7) == 5
    assert user.area_last_question == {
        "automation": (T0 + timedelta(days=9)).isoformat(),
        "general": T0.isoformat(),
    }


def test_per_area_days_are_kept_for_the_area_window_only() -> None:
    config = ViewConfig(max_lateness=timedelta(days=1))
    keep = config.area_keep_days
    assert keep == windows.AREA_WINDOW_DAYS + 2 < config.keep_days
    # Reporting is not used again after day 0: its day goes when the newest day moves past it.
    users, _, _ = fold([track(0, "reporting"), track(100, "core"), track(100 - keep + 1)], config)
    user = users["u1"]
    assert user.area_daily_usage["reporting"] == {}
    assert len(user.area_daily_usage["core"]) == 2
    # An event older than the window (behind the newest) is not bucketed.
    users, _, _ = fold([track(100), track(100 - keep - 1)], config)
    assert len(users["u1"].area_daily_usage["core"]) == 1


def test_a_view_stored_before_per_area_recency_still_loads() -> None:
    users, _, _ = fold([track(0, "reporting")])
    stored = users["u1"].model_dump()
    del stored["area_daily_usage"], stored["area_last_question"]
    old = UserState.model_validate(stored)
    assert old.area_daily_usage == {} and old.area_last_question == {}
    # The next event fills the recency in.
    apply_event(new_account(track(1)), old, track(1, "reporting"))
    assert old.area_daily_usage == {"reporting": {"2026-11-02": 1}}
