from services.ingest.view import apply_to_account, apply_to_user, new_account, new_user
from tests.factories import event


def _fold(*events):
    user = new_user(events[0]) if events[0].user_id else None
    account = new_account(events[0])
    triggers = []
    for e in events:
        triggers += apply_to_account(account, e)
        if user is not None and e.user_id:
            triggers += apply_to_user(user, e)
    return user, account, triggers


def test_counts_usage_and_identity() -> None:
    user, account, _ = _fold(
        event("user.identify", {"role": "admin", "email": "ana@example.com", "timezone": "UTC"}),
        event("product.track", {"event": "project_created", "feature_area": "core"}, minutes=1),
        event("product.track", {"event": "project_created", "feature_area": "core"}, minutes=2),
        event(
            "product.track", {"event": "dashboard_built", "feature_area": "reporting"}, minutes=3
        ),
    )
    assert user.role == "admin" and user.email == "ana@example.com"
    assert user.event_count == 4 and account.event_count == 4
    assert user.track_events == {"project_created": 2, "dashboard_built": 1}
    assert user.feature_usage == {"core": 2, "reporting": 1}
    assert user.event_counts == {"user.identify": 1, "product.track": 3}


def test_late_events_land_in_place() -> None:
    user, _, _ = _fold(
        event("survey.nps", {"score": 9}, minutes=60),
        event("survey.nps", {"score": 2}, minutes=10),  # arrives late, answered earlier
    )
    assert user.last_nps == 9
    assert user.last_seen.minute == 0 and user.last_seen.hour == 10
    assert user.first_seen.minute == 10


def test_nps_detractor_fires_a_trigger() -> None:
    _, _, triggers = _fold(event("survey.nps", {"score": 4}))
    assert [t.name for t in triggers] == ["nps_detractor"]
    _, _, none = _fold(event("survey.nps", {"score": 8}))
    assert none == []


def test_contract_signed_fires_once_and_payment_failed() -> None:
    sub = "billing.subscription_updated"
    _, account, triggers = _fold(
        event(sub, {"plan": "pro", "mrr": 500}, user=None),
        event(sub, {"plan": "pro", "mrr": 700}, user=None, minutes=1),
        event(sub, {"plan": "pro", "status": "past_due"}, user=None, minutes=2),
    )
    assert [t.name for t in triggers] == ["contract_signed", "payment_failed"]
    assert account.plan == "pro" and account.subscription_status == "past_due"


def test_tickets_open_and_close() -> None:
    _, account, _ = _fold(
        event("support.ticket_opened", {"ticket_id": "t1", "priority": "high"}),
        event("support.ticket_opened", {"ticket_id": "t2"}),
        event("support.ticket_solved", {"ticket_id": "t1"}),
    )
    assert account.open_tickets == {"t2": "normal"}


def test_responses_mark_achieved_and_dismissed() -> None:
    user, _, _ = _fold(
        event(
            "nbv.response",
            {"decision_id": "d1", "element_id": "invite-teammates", "outcome": "completed"},
        ),
        event(
            "nbv.response",
            {"decision_id": "d1", "element_id": "automation-webinar", "outcome": "dismissed"},
        ),
        event("nbv.response", {"decision_id": "d1", "element_id": "x", "outcome": "clicked"}),
    )
    assert set(user.achieved) == {"invite-teammates"}
    assert set(user.dismissed) == {"automation-webinar"}
