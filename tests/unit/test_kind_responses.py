"""The person's answers to earlier cards, by kind of element, and the element's stage against
their situation: what the decision reads from the view, and the columns the ranker gets."""

from __future__ import annotations

from datetime import timedelta

import pytest

from models.features import (
    INDEX,
    NEVER_DAYS,
    PRIOR_ENGAGED,
    RESPONSE_PRIOR_CARDS,
    ElementFacts,
    build_matrix,
    context_vector,
    kind_responses,
    past_outcomes,
)
from services.decision.engine import context_of
from services.ingest.view import apply_event, new_account, new_user
from shared.envelope import Event
from tests.factories import T0, event

ELEMENTS = {
    "g1": ElementFacts("guide", "engage", (), 1.0, 10, "core", "g1"),
    "g2": ElementFacts("guide", "renew", (), 1.0, 10, "core", "g2"),
    "v1": ElementFacts("video", "onboard", (), 1.0, 5, "reporting", "v1"),
    "w1": ElementFacts("webinar", "grow", (), 1.0, 60, None, "w1"),
}


def _response(decision: str, element: str, outcome: str, minutes: float) -> Event:
    return event(
        "nbv.response",
        {
            "decision_id": decision,
            "element_id": element,
            "outcome": outcome,
            "channel": "in_app",
        },
        at=T0 + timedelta(days=1, minutes=minutes),
    )


def test_cards_are_counted_once_each_by_the_furthest_they_got() -> None:
    responses = [
        # A guide shown, clicked and completed: one card, engaged with and completed.
        {"decision_id": "d1", "element_id": "g1", "outcome": "shown"},
        {"decision_id": "d1", "element_id": "g1", "outcome": "clicked"},
        {"decision_id": "d1", "element_id": "g1", "outcome": "completed"},
        # Another guide shown and left alone, then shown again by another decision, dismissed.
        {"decision_id": "d2", "element_id": "g2", "outcome": "shown"},
        {"decision_id": "d3", "element_id": "g2", "outcome": "shown"},
        {"decision_id": "d3", "element_id": "g2", "outcome": "dismissed"},
        # A video only snoozed: a client may snooze cards it never displayed; not seen.
        {"decision_id": "d4", "element_id": "v1", "outcome": "snoozed"},
        # An element no longer in the library.
        {"decision_id": "d5", "element_id": "gone", "outcome": "shown"},
    ]
    assert kind_responses(responses, ELEMENTS) == {"guide": (3, 1, 1, 1)}


def test_the_view_responses_reach_the_context_and_the_kind_columns() -> None:
    events = [event("product.track", {"event": "x", "feature_area": "core"}, at=T0)]
    events += [
        _response("d1", "g1", "shown", 0),
        _response("d1", "g1", "completed", 5),
        _response("d2", "g2", "shown", 60),
        _response("d2", "g2", "clicked", 61),
        _response("d3", "v1", "shown", 120),
        _response("d4", "v1", "shown", 180),
        _response("d4", "v1", "dismissed", 181),
    ]
    account, user = new_account(events[0]), new_user(events[0])
    for e in events:
        apply_event(account, user, e)
    now = T0 + timedelta(days=2)
    ctx = context_of(user, account, now)
    ctx = past_outcomes(ctx, user.achieved, user.dismissed, ELEMENTS, user.interventions)
    assert ctx.kind_responses == {"guide": (2, 2, 1, 0), "video": (2, 0, 0, 1)}

    overall = context_vector(ctx)
    k = RESPONSE_PRIOR_CARDS
    assert overall["cards_seen"] == 4
    assert overall["engaged_rate"] == pytest.approx((2 + k * PRIOR_ENGAGED) / (4 + k))
    m = build_matrix(ctx, list(ELEMENTS.values()), overall)
    col = {name: m[:, INDEX[name]].tolist() for name in INDEX}
    assert col["kind_seen"] == [2, 2, 2, 0]
    # Guides taken up, videos not: the taste reads above and below the person's average; the
    # webinar, never seen, reads as their average.
    assert col["kind_taste"][0] > 1 > col["kind_taste"][2]
    assert col["kind_taste"][3] == pytest.approx(1.0)
    assert col["kind_engaged_rate"][3] == pytest.approx(overall["engaged_rate"])
    assert col["kind_dismissed_rate"][2] > overall["dismissed_rate"] > col["kind_dismissed_rate"][0]


def test_a_person_without_answers_reads_as_the_population_prior() -> None:
    events = [event("product.track", {"event": "x", "feature_area": "core"}, at=T0)]
    account, user = new_account(events[0]), new_user(events[0])
    ctx = past_outcomes(context_of(user, account, T0), {}, {}, ELEMENTS, user.interventions)
    m = build_matrix(ctx, list(ELEMENTS.values()))
    assert (m[:, INDEX["cards_seen"]] == 0).all()
    assert m[:, INDEX["engaged_rate"]] == pytest.approx([PRIOR_ENGAGED] * 4)
    assert m[:, INDEX["kind_taste"]] == pytest.approx([1.0] * 4)


def test_the_stage_columns_put_an_element_against_renewal_and_tenure() -> None:
    first = event("product.track", {"event": "x", "feature_area": "core"}, at=T0)
    renewal = event(
        "billing.subscription_updated",
        {
            "subscription_id": "s1",
            "plan": "growth",
            "status": "active",
            "mrr": 1000.0,
            "renewal_date": (T0 + timedelta(days=50)).isoformat(),
        },
        user=None,
        at=T0,
    )
    account, user = new_account(first), new_user(first)
    apply_event(account, user, first)
    apply_event(account, None, renewal)
    now = T0 + timedelta(days=10)
    ctx = context_of(user, account, now)
    m = build_matrix(ctx, list(ELEMENTS.values()))
    # Only the renew-stage element reads the days to renewal, only the onboarding one the
    # tenure; the others "never", so a tree tells them apart in one split.
    assert m[:, INDEX["renew_days"]].tolist() == [NEVER_DAYS, 40.0, NEVER_DAYS, NEVER_DAYS]
    assert m[:, INDEX["onboard_days"]].tolist() == [NEVER_DAYS, NEVER_DAYS, 10.0, NEVER_DAYS]
