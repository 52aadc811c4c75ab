import random
from collections import Counter
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from models.features import FEATURES, INDEX, Context, ElementFacts, build_matrix
from models.ranker import LightGBMRanker, RulePrior
from models.train import fit_calibration, train_ranker
from services.decision.explain import model_reasons, prior_reasons, reason
from services.decision.policy import Softmax, make_policy

NOW = datetime(2026, 11, 20, tzinfo=UTC)


def test_softmax_propensities_match_frequencies_and_temperature_limits() -> None:
    policy = Softmax(0.2, random.Random(3))
    scores = [0.9, 0.6, 0.3]
    counts: Counter[int] = Counter()
    logged: dict[int, float] = {}
    trials = 20_000
    for _ in range(trials):
        first = policy.choose(scores, 1)[0]
        counts[first.index] += 1
        logged[first.index] = first.propensity
    weights = np.exp(np.array(scores) / 0.2)
    for i, p in enumerate(weights / weights.sum()):
        assert logged[i] == pytest.approx(p)
        assert counts[i] / trials == pytest.approx(p, abs=0.015)
    greedy = Softmax(1e-4, random.Random(0)).choose(scores, 3)
    assert [p.index for p in greedy] == [0, 1, 2]
    assert all(p.propensity == pytest.approx(1.0) for p in greedy)
    assert make_policy("softmax", 0.1, 0.5, 1).name == "softmax(0.5)"
    assert make_policy("epsilon_greedy", 0.1, 0.5, 1).name == "epsilon-greedy(0.1)"


def _ctx(**kw: object) -> Context:
    base: dict[str, object] = {
        "now": NOW,
        "role": "admin",
        "first_seen": NOW - timedelta(days=5),
        "last_seen": NOW,
        "event_count": 3,
    }
    base.update(kw)
    return Context(**base)  # type: ignore[arg-type]


def test_prior_p_success_is_its_odds_and_explains_its_factors() -> None:
    el = ElementFacts("human_touch", "monitor", ["admin"], 0.8, 30, None)
    ctx = _ctx(last_nps=2)
    m = build_matrix(ctx, [el])
    prior = RulePrior()
    scores = prior.score(m)
    odds = scores[0] / 0.8
    assert prior.p_success(m, scores)[0] == pytest.approx(odds / (1 + odds))
    reasons = prior_reasons(ctx, el)
    assert "fits the monitor stage" in reasons and "a detractor needs a human touch" in reasons


def test_usage_drop_raises_the_need_for_monitor_elements() -> None:
    el = ElementFacts("guide", "monitor", [], 0.5, 5, None)
    steady = build_matrix(_ctx(usage_7d=10, usage_prev_7d=10), [el])[0, INDEX["rule_score"]]
    dropped = build_matrix(_ctx(usage_7d=2, usage_prev_7d=10), [el])
    assert dropped[0, INDEX["usage_wow_change"]] == pytest.approx(-0.8)
    assert dropped[0, INDEX["rule_score"]] > steady


def test_lightgbm_contributions_name_the_deciding_feature() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((600, len(FEATURES)))
    y = (x[:, INDEX["value_weight"]] > 0.5).astype(float)
    booster = train_ranker(x, y, [6] * 100, num_trees=20)
    ranker = LightGBMRanker(booster, "t")
    contrib = ranker.contributions(x[:2])
    assert contrib is not None and contrib.shape == (2, len(FEATURES) + 1)
    assert model_reasons(contrib[0])[0].startswith("business value")
    # Noisy outcomes: the calibrated probability follows the success rate, not 0/1.
    noisy = (x[:, INDEX["value_weight"]] + rng.normal(0, 0.3, len(x)) > 0.5).astype(float)
    cal = fit_calibration(ranker.score(x), noisy)
    calibrated = LightGBMRanker(booster, "t", cal["slope"], cal["intercept"])
    p = calibrated.p_success(x, calibrated.score(x))
    assert p[y == 1].mean() > p[y == 0].mean() and ((p > 0.01) & (p < 0.99)).all()


def test_reason_reads_rules_then_ranker_then_arithmetic() -> None:
    text = reason(
        rules=["renewal-window"],
        ranker_reasons=["fits the renew stage"],
        p_success=0.42,
        value_weight=0.9,
        lever=1.5,
        required=False,
    )
    assert text == (
        "boosted by rule renewal-window; fits the renew stage; "
        "P(success) 0.42 × value 0.9 × lever 1.5"
    )
