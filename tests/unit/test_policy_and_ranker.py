import random
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from models import compiled
from models.features import FEATURES, INDEX, Context, ElementFacts, build_matrix
from models.ranker import LightGBMRanker, ModelError, RulePrior, load_model, save_model
from models.train import train_ranker, training_meta
from services.decision.policy import EpsilonGreedy

NOW = datetime(2026, 11, 20, tzinfo=UTC)


def test_greedy_policy_takes_the_top_scores_with_certainty() -> None:
    picks = EpsilonGreedy(0.0).choose([0.1, 0.9, 0.5], k=2)
    assert [p.index for p in picks] == [1, 2]
    assert [p.propensity for p in picks] == [1.0, 1.0]


def test_logged_propensity_matches_how_often_an_item_is_chosen() -> None:
    policy = EpsilonGreedy(0.3, random.Random(42))
    scores = [0.9, 0.5, 0.1, 0.05]
    trials = 20_000
    counts: Counter[int] = Counter()
    logged: dict[int, float] = {}
    for _ in range(trials):
        first = policy.choose(scores, k=1)[0]
        counts[first.index] += 1
        logged[first.index] = first.propensity
    assert logged[0] == pytest.approx(0.7 + 0.3 / 4)
    for index, propensity in logged.items():
        assert counts[index] / trials == pytest.approx(propensity, abs=0.015)


def test_epsilon_is_validated() -> None:
    with pytest.raises(ValueError):
        EpsilonGreedy(1.5)


def _ctx(**kw: object) -> Context:
    base: dict[str, object] = {
        "now": NOW,
        "role": "admin",
        "first_seen": NOW - timedelta(days=5),
        "last_seen": NOW - timedelta(hours=1),
        "event_count": 12,
    }
    base.update(kw)
    return Context(**base)  # type: ignore[arg-type]


def _el(kind: str = "guide", stage: str = "onboard", weight: float = 0.5) -> ElementFacts:
    return ElementFacts(kind, stage, ["admin"], weight, 10, "core")


def test_stage_inference() -> None:
    assert _ctx().stage() == "onboard"
    assert _ctx(last_nps=3).stage() == "monitor"
    assert _ctx(renewal_date=NOW + timedelta(days=60)).stage() == "renew"
    assert _ctx(first_seen=NOW - timedelta(days=90)).stage() == "engage"


def test_rule_prior_prefers_stage_fit_and_human_touch_for_detractors() -> None:
    prior = RulePrior()
    fit, misfit = prior.score(build_matrix(_ctx(), [_el(), _el(stage="grow")]))
    assert fit > misfit
    detractor = _ctx(last_nps=2)
    call, guide = prior.score(
        build_matrix(detractor, [_el("human_touch", "monitor"), _el("guide", "monitor")])
    )
    assert call > guide


def test_trained_model_saves_loads_and_ranks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    groups = [6] * 150
    x = rng.random((sum(groups), len(FEATURES)))
    # The signal the model must find: one feature decides what gets completed.
    y = (x[:, INDEX["value_weight"]] > 0.6).astype(float)
    booster = train_ranker(x, y, groups, num_trees=30)
    save_model(booster, tmp_path, "m1", training_meta(len(y), len(groups)))
    ranker = load_model(tmp_path, "m1")
    assert isinstance(ranker, LightGBMRanker) and ranker.version == "m1"
    probe = np.zeros((2, len(FEATURES)))
    probe[0, INDEX["value_weight"]] = 0.9
    probe[1, INDEX["value_weight"]] = 0.1
    high, low = ranker.score(probe)
    assert high > low


def _binary_booster(seed: int) -> lgb.Booster:
    rng = np.random.default_rng(seed)
    x = rng.random((600, len(FEATURES)))
    x[rng.random(x.shape) < 0.1] = np.nan
    x[rng.random(x.shape) < 0.1] = 0.0
    y = (np.nan_to_num(x[:, 0]) + rng.random(600) > 1).astype(int)
    params = {"objective": "binary", "num_leaves": 7, "verbose": -1, "seed": seed}
    return lgb.train(params, lgb.Dataset(x, y), num_boost_round=25)


def test_the_compiled_ranker_scores_as_lightgbm_does() -> None:
    booster = _binary_booster(3)
    ranker = LightGBMRanker(booster, "m")
    assert ranker._predict is not None  # lleaves compiled it
    rng = np.random.default_rng(4)
    probe = rng.random((40, len(FEATURES))) * 3
    probe[rng.random(probe.shape) < 0.2] = np.nan  # missing, and zeros, go LightGBM's way
    probe[rng.random(probe.shape) < 0.2] = 0.0
    np.testing.assert_allclose(
        ranker.score(probe), booster.predict(probe, num_threads=1), rtol=0, atol=1e-12
    )
    assert ranker.score(probe[:1]).shape == (1,)


@pytest.mark.parametrize("why", ["no lleaves", "the compile fails"])
def test_where_lleaves_cannot_compile_lightgbm_predicts(
    why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if why == "no lleaves":
        monkeypatch.setitem(sys.modules, "lleaves", None)  # import lleaves: ImportError
    else:
        monkeypatch.setattr(compiled, "COMPILE_TIMEOUT_S", 0.001)  # the child never finishes
    booster = _binary_booster(5)
    ranker = LightGBMRanker(booster, "m")
    assert ranker._predict is None
    probe = np.random.default_rng(6).random((5, len(FEATURES)))
    assert list(ranker.score(probe)) == list(booster.predict(probe, num_threads=1))


def test_a_model_for_other_features_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no model 'missing'"):
        load_model(tmp_path, "missing")
    x = np.random.default_rng(1).random((40, len(FEATURES)))
    booster = train_ranker(x, (x[:, 0] > 0.5).astype(float), [10] * 4, num_trees=3)
    folder = save_model(booster, tmp_path, "old", {})
    meta = folder / "meta.json"
    meta.write_text(meta.read_text().replace('"rule_score"', '"something_else"'))
    with pytest.raises(ModelError, match="other features than this code builds: it lacks"):
        load_model(tmp_path, "old")
