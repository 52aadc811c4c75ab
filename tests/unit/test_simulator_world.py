"""The simulated world: deterministic from its seed, and responses that follow the hidden fit."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]

from models.export import best_outcome, context_from_features
from models.features import FEATURES, context_vector
from models.logdata import LogData
from models.simulator.driver import library_fits
from models.simulator.events import onboarding_events, person_week_events
from models.simulator.world import build_world, new_person, on_completed, respond_probabilities
from shared.envelope import EVENT_ADAPTER

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


def test_same_seed_same_world_and_event_ids() -> None:
    a, b = build_world(5, 6), build_world(5, 6)
    assert [p.user_id for x in a for p in x.people] == [p.user_id for x in b for p in x.people]
    assert [x.plan for x in a] == [x.plan for x in b]
    ids_a = [e["id"] for e in onboarding_events(a[0], 5, NOW)]
    ids_b = [e["id"] for e in onboarding_events(b[0], 5, NOW)]
    assert ids_a == ids_b
    assert build_world(6, 6)[0].people[0].user_id != a[0].people[0].user_id


def test_every_emitted_event_is_accepted_by_the_envelope() -> None:
    world = build_world(1, 4)
    events = [e for acct in world for e in onboarding_events(acct, 1, NOW)]
    for p in world[0].people:
        events.extend(person_week_events(p, 1, 0, NOW, random.Random(1))[0])
    assert any(e["type"] == "product.track" for e in events)
    for e in events:
        EVENT_ADAPTER.validate_python(e)  # raises on anything ingest would reject


def test_fit_drives_responses() -> None:
    fits, _ = library_fits()
    p = new_person(random.Random(0), "u", "a", "end_user", tenure=1)
    p.need = dict.fromkeys(p.need, 0.0)
    p.need["core"] = 0.9
    good = respond_probabilities(p, "product-tour", fits["product-tour"], 20)[0]
    # An admin-area guide for an end user with no admin need helps far less.
    bad = respond_probabilities(p, "configure-sso", fits["configure-sso"], 20)[0]
    assert good > 3 * bad
    # Fatigue and repetition lower the response to the very same card.
    p.fatigue, p.shown["product-tour"] = 6.0, 2
    assert respond_probabilities(p, "product-tour", fits["product-tour"], 20)[0] < good / 2


def test_completing_meets_the_need() -> None:
    fits, _ = library_fits()
    p = new_person(random.Random(0), "u", "a", "end_user", tenure=1)
    before = p.need["core"]
    on_completed(p, fits["product-tour"])
    assert p.need["core"] < before
    assert p.satisfaction > 0


def test_export_rebuilds_the_logged_context_and_picks_the_best_outcome() -> None:
    from models.features import Context

    ctx = Context(
        now=NOW,
        role="admin",
        first_seen=datetime(2026, 1, 1, tzinfo=UTC),
        last_seen=datetime(2026, 5, 30, tzinfo=UTC),
        event_count=42,
        last_nps=5,
        open_tickets=2,
        renewal_date=datetime(2026, 8, 1, tzinfo=UTC),
        usage_7d=30,
        usage_prev_7d=60,
        mrr=1200.0,
    )
    logged = context_vector(ctx)
    rebuilt = context_vector(context_from_features(logged, NOW))
    for name, value in logged.items():
        if name != "feature_breadth":  # per-area usage is not in the logged features
            assert rebuilt[name] == __import__("pytest").approx(value, rel=1e-6), name
    assert best_outcome(["shown", "clicked", "snoozed"]) == "clicked"
    assert best_outcome(["shown", "completed", "clicked"]) == "completed"
    assert best_outcome([]) is None


def test_log_queries_are_contiguous_and_split_by_time() -> None:
    n = 6
    table = pa.table(
        {
            "decision_id": [f"d{i}" for i in range(n)],
            "user_id": ["b", "a", "b", "a", "c", "a"],
            "element_id": ["e"] * n,
            "model_version": ["rules-v1"] * n,
            "decided_at": pa.array(
                [datetime(2026, 6, 1, i, tzinfo=UTC) for i in range(n)],
                type=pa.timestamp("us", tz="UTC"),
            ),
            "label": [0, 1, 2, 0, 0, 1],
            "reward": [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
            "propensity": [1.0] * n,
            "shown": [True, True, True, True, False, True],
            "lever": [1.0] * n,
            **{f: np.arange(n, dtype=float) for f in FEATURES},
        }
    )
    data = LogData.from_table(table)
    q, groups = data.ranking_queries("user")
    assert groups == [3, 2]  # a: d1, d3, d5; b: d0, d2 (c was not shown)
    assert list(q.decision_id) == ["d1", "d3", "d5", "d0", "d2"]
    split = data.split_time(0.25)
    assert (data.decided_at >= split).sum() == 2


def _served_decision(with_usage: bool) -> tuple[object, np.ndarray, list[str]]:
    """A decision as the engine logs it under the rule prior, and the matrix it ranked."""
    from models.features import Context, build_matrix
    from models.ranker import RulePrior
    from services.decision.engine import facts
    from services.decision.library import load_library
    from shared.store.models import DecisionRow

    ctx = Context(
        now=NOW,
        role="champion",
        first_seen=datetime(2026, 3, 1, tzinfo=UTC),
        last_seen=datetime(2026, 5, 31, tzinfo=UTC),
        event_count=120,
        feature_usage={"core": 40, "reporting": 3},
        open_tickets=1,
        usage_7d=25,
        usage_prev_7d=70,
    )
    elements = [e for e in load_library().elements if "champion" in [r.value for r in e.roles]]
    elements = elements[:8]
    matrix = build_matrix(ctx, [facts(e) for e in elements])
    prior = RulePrior()
    scores = prior.score(matrix)
    p = prior.p_success(matrix, scores)
    context: dict[str, object] = {
        "stage": ctx.stage(),
        "features": context_vector(ctx),
        "library_version": 1,
    }
    if with_usage:
        context["feature_usage"] = dict(ctx.feature_usage)
    row = DecisionRow(
        id="d1",
        user_id="u1",
        account_id="a1",
        created_at=NOW,
        channel="in_app",
        trigger=None,
        policy="epsilon-greedy(0.1)",
        model_version="rules-v1",
        context=context,
        candidates=[
            {
                "element_id": e.id,
                "excluded_by": None,
                "score": float(scores[i]),
                "p_success": float(p[i]),
                "lever": 1.0,
                "final": float(p[i]) * e.value_weight,
            }
            for i, e in enumerate(elements)
        ],
        chosen=[{"element_id": elements[2].id, "rank": 1, "propensity": 0.8125}],
    )
    return row, matrix, [e.id for e in elements]


def test_export_reproduces_the_served_features() -> None:
    from models.export import decision_rows
    from models.features import INDEX
    from services.decision.library import load_library

    library = {e.id: e for e in load_library().elements}
    for with_usage in (False, True):
        row, served, ids = _served_decision(with_usage)
        out = decision_rows(row, library, {ids[2]: ["shown", "completed"]})  # type: ignore[arg-type]
        exported = out.features
        columns = [j for j in range(len(FEATURES)) if with_usage or j != INDEX["area_usage"]]
        np.testing.assert_allclose(exported[:, columns], served[:, columns], rtol=1e-9)
        chosen = [m for m in out.meta if m["shown"]]
        assert [m["element_id"] for m in chosen] == [ids[2]]
        assert chosen[0]["label"] == 2 and chosen[0]["reward"] == 1.0
        assert chosen[0]["propensity"] == 0.8125
        assert all(m["rank"] == -1 for m in out.meta if not m["shown"])
