"""The decision's context reads per-area recency from the view: usage this week and the week
before by area, and days since the newest support ticket about each area."""

from __future__ import annotations

from datetime import timedelta

from models.features import INDEX, NEVER_DAYS, ElementFacts, build_matrix
from services.decision.engine import context_of
from services.ingest.view import apply_event, new_account, new_user
from shared.envelope import Event
from tests.factories import T0, event


def _track(day: float, area: str) -> Event:
    return event(
        "product.track",
        {"event": "x", "feature_area": area},
        at=T0 + timedelta(days=day),
    )


def test_context_and_features_see_what_is_under_way_in_an_area() -> None:
    # Reporting: 6 events last week, 2 this week (winding down); automation: 4 this week only.
    events = [_track(1 + i / 10, "reporting") for i in range(6)]
    events += [_track(9 + i / 10, "reporting") for i in range(2)]
    events += [_track(10 + i / 10, "automation") for i in range(4)]
    events.append(
        event(
            "support.ticket_opened",
            {"ticket_id": "t1", "feature_area": "automation"},
            at=T0 + timedelta(days=11),
        )
    )
    account, user = new_account(events[0]), new_user(events[0])
    for e in events:
        apply_event(account, user, e)
    now = T0 + timedelta(days=13, hours=12)
    ctx = context_of(user, account, now)
    assert ctx.area_usage_7d == {"reporting": 2, "automation": 4}
    assert ctx.area_usage_prev_7d == {"reporting": 6}
    assert ctx.area_question_days == {"automation": 2.5}
    # A stored view from before these fields reads as "nothing recent".
    old = user.model_copy(update={"area_daily_usage": {}, "area_last_question": {}})
    assert context_of(old, account, now).area_usage_7d == {}

    def facts(area: str | None) -> ElementFacts:
        return ElementFacts("guide", "engage", (), 1.0, 10, area)

    m = build_matrix(ctx, [facts("automation"), facts("reporting"), facts("core"), facts(None)])
    col = {name: m[:, INDEX[name]].tolist() for name in INDEX}
    assert col["area_share_7d"] == [4 / 6, 2 / 6, 0.0, 0.0]
    assert col["days_since_area_question"] == [2.5, NEVER_DAYS, NEVER_DAYS, NEVER_DAYS]
    assert col["area_trend"][0] > 0 > col["area_trend"][1] and col["area_trend"][2] == 0.0
