"""The feature matrix, built column by column for speed, equals the features defined one
element at a time (the documented prior included), for any person and any elements."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from models.features import (
    AREAS,
    FEATURES,
    INDEX,
    KINDS,
    NEVER_DAYS,
    RESPONSE_PRIOR_CARDS,
    ROLES,
    STAGES,
    Context,
    ElementFacts,
    build_matrix,
    context_vector,
    rule_score,
)

NOW = datetime(2026, 11, 20, tzinfo=UTC)
AREA_NAMES = (*AREAS, "unlisted")


def reference_row(ctx: Context, el: ElementFacts) -> np.ndarray:
    """One element's features, straight from their definitions."""
    row = np.zeros(len(FEATURES))
    for name, value in context_vector(ctx).items():
        row[INDEX[name]] = value
    row[INDEX["value_weight"]] = el.value_weight
    row[INDEX["effort_minutes"]] = el.effort_minutes
    row[INDEX[f"kind_{el.kind}"]] = 1.0
    row[INDEX[f"stage_{el.stage}"]] = 1.0
    row[INDEX["stage_match"]] = float(el.stage == ctx.stage())
    row[INDEX["role_match"]] = float(not el.roles or ctx.role in el.roles)
    row[INDEX["rule_score"]] = rule_score(ctx, el)
    area = el.feature_area
    if area:
        used = ctx.feature_usage.get(area, 0)
        total = sum(ctx.feature_usage.values())
        row[INDEX["area_usage"]] = math.log1p(used)
        if f"area_{area}" in INDEX:
            row[INDEX[f"area_{area}"]] = 1.0
        row[INDEX["area_share"]] = used / total if total else 0.0
        row[INDEX["area_sophistication"]] = ctx.area_sophistication.get(area, 0.0)
        row[INDEX["area_questions"]] = ctx.area_questions.get(area, 0)
    times, days = ctx.offer_history.get(el.element_id, (0, NEVER_DAYS))
    row[INDEX["times_offered"]], row[INDEX["days_since_offered"]] = times, days
    achieved, dismissed = ctx.area_outcomes.get(area or "", (0, 0))
    row[INDEX["area_achieved"]], row[INDEX["area_dismissed"]] = achieved, dismissed
    achieved, dismissed = ctx.kind_outcomes.get(el.kind, (0, 0))
    row[INDEX["kind_achieved"]], row[INDEX["kind_dismissed"]] = achieved, dismissed
    # Per-area recency: none for an element without an area (no ticket ever, as for offers).
    row[INDEX["days_since_area_question"]] = NEVER_DAYS
    if area:
        week = ctx.area_usage_7d.get(area, 0)
        row[INDEX["area_usage_7d"]] = math.log1p(week)
        row[INDEX["area_share_7d"]] = week / sum(ctx.area_usage_7d.values()) if week else 0.0
        row[INDEX["area_trend"]] = math.log1p(week) - math.log1p(
            ctx.area_usage_prev_7d.get(area, 0)
        )
        days = ctx.area_question_days.get(area, NEVER_DAYS)
        row[INDEX["days_since_area_question"]] = min(days, NEVER_DAYS)
    # The kind's answers: shrunk towards the person's overall rates, and relative to them.
    seen, engaged, completed, dismissed = ctx.kind_responses.get(el.kind, (0, 0, 0, 0))
    overall = context_vector(ctx)
    k = RESPONSE_PRIOR_CARDS
    row[INDEX["kind_seen"]] = seen
    row[INDEX["kind_engaged_rate"]] = (engaged + k * overall["engaged_rate"]) / (seen + k)
    row[INDEX["kind_completed_rate"]] = (completed + k * overall["completed_rate"]) / (seen + k)
    row[INDEX["kind_dismissed_rate"]] = (dismissed + k * overall["dismissed_rate"]) / (seen + k)
    row[INDEX["kind_taste"]] = row[INDEX["kind_engaged_rate"]] / overall["engaged_rate"]
    row[INDEX["renew_days"]] = overall["days_to_renewal"] if el.stage == "renew" else NEVER_DAYS
    row[INDEX["onboard_days"]] = overall["tenure_days"] if el.stage == "onboard" else NEVER_DAYS
    return row


areas = st.sampled_from(AREA_NAMES)
counts = st.integers(0, 50)
pairs = st.tuples(st.integers(0, 5), st.integers(0, 5))

elements = st.builds(
    ElementFacts,
    kind=st.sampled_from(KINDS),
    stage=st.sampled_from(STAGES),
    roles=st.lists(st.sampled_from(ROLES), max_size=2),
    value_weight=st.floats(0.1, 3.0),
    effort_minutes=st.integers(0, 240),
    feature_area=st.none() | areas,
    element_id=st.sampled_from([f"e{i}" for i in range(6)]),
)

contexts = st.builds(
    Context,
    now=st.just(NOW),
    role=st.none() | st.sampled_from(ROLES),
    first_seen=st.integers(0, 800).map(lambda d: NOW - timedelta(days=d)),
    last_seen=st.integers(0, 40).map(lambda d: NOW - timedelta(days=d)),
    event_count=st.integers(0, 5000),
    feature_usage=st.dictionaries(areas, counts, max_size=5),
    last_nps=st.none() | st.integers(0, 10),
    open_tickets=st.integers(0, 3),
    renewal_date=st.none() | st.integers(-30, 400).map(lambda d: NOW + timedelta(days=d)),
    usage_7d=st.floats(0, 100),
    usage_prev_7d=st.floats(0, 100),
    area_sophistication=st.dictionaries(areas, st.floats(0, 1), max_size=3),
    area_questions=st.dictionaries(areas, counts, max_size=3),
    area_usage_7d=st.dictionaries(areas, counts, max_size=4),
    area_usage_prev_7d=st.dictionaries(areas, counts, max_size=4),
    area_question_days=st.dictionaries(areas, st.floats(0, 2 * NEVER_DAYS), max_size=3),
    offer_history=st.dictionaries(
        st.sampled_from([f"e{i}" for i in range(6)]),
        st.tuples(st.integers(1, 5), st.floats(0, 60)),
        max_size=3,
    ),
    area_outcomes=st.dictionaries(areas, pairs, max_size=3),
    kind_outcomes=st.dictionaries(st.sampled_from(KINDS), pairs, max_size=3),
    kind_responses=st.dictionaries(
        st.sampled_from(KINDS),
        st.tuples(st.integers(0, 20), st.integers(0, 5), st.integers(0, 5), st.integers(0, 5)),
        max_size=4,
    ),
)


@settings(max_examples=300, deadline=None)
@given(contexts, st.lists(elements, max_size=12))
def test_matrix_equals_the_per_element_definitions(ctx: Context, els: list[ElementFacts]) -> None:
    matrix = build_matrix(ctx, els)
    assert matrix.shape == (len(els), len(FEATURES))
    for row, el in zip(matrix, els, strict=True):
        np.testing.assert_array_equal(row, reference_row(ctx, el))
