"""Training options of models/fit.py: what a probabilistic objective learns (``target``) and the
refit on the whole log once early stopping has chosen the number of trees (``refit``)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from pydantic import ValidationError

from models.features import FEATURES
from models.fit import TrainConfig, labels, train_from_log
from models.logdata import LogData
from tests.factories import log_table

T0 = datetime(2026, 6, 1, 9, tzinfo=UTC)


def _log(features: np.ndarray, grade: np.ndarray) -> LogData:
    """One shown card per decision, a minute apart; ``grade``: 2 completed, 1 clicked, 0 not."""
    rows = [
        {
            "decision_id": f"d{i}",
            "user_id": f"u{i % 40}",
            "element_id": "e",
            "model_version": "m",
            "label": int(g),
            "reward": 1.0 if g == 2 else 0.0,
            "propensity": 1.0,
            "shown": True,
            "lever": 1.0,
            "rank": 1,
            "completed_after_h": 0.1 if g == 2 else math.nan,
            "decided_at": T0 + timedelta(minutes=i),
        }
        for i, g in enumerate(grade)
    ]
    return LogData.from_table(log_table(rows, features))


def _config(**extra: object) -> TrainConfig:
    params = {"objective": "binary", "min_data_in_leaf": 20, "learning_rate": 0.1}
    return TrainConfig.model_validate(
        {"params": params, "num_boost_round": 40, "early_stopping_rounds": 40, **extra}
    )


def test_the_target_of_a_probabilistic_objective() -> None:
    data = _log(np.zeros((3, len(FEATURES))), np.array([2, 1, 0]))
    assert labels(data, _config()).tolist() == [1.0, 0.0, 0.0]
    assert labels(data, _config(target="engaged")).tolist() == [1.0, 1.0, 0.0]
    grade = _config(target="grade", params={"objective": "cross_entropy"})
    assert labels(data, grade).tolist() == [1.0, 0.5, 0.0]
    # Lambdarank learns the relevance grade whatever the target.
    assert labels(data, TrainConfig(target="engaged")).tolist() == [2.0, 1.0, 0.0]
    with pytest.raises(ValidationError, match="cross_entropy"):
        _config(target="grade")  # binary takes labels 0 and 1 only


def test_refit_learns_from_the_held_out_period_too() -> None:
    """Cards of a new sort (feature 2) appear only in the held-out last quarter, and are always
    completed: the model fitted before it cannot know them, the refitted one ranks them first,
    with as many trees as early stopping chose, and both are returned."""
    rng = np.random.default_rng(5)
    n = 2_000
    features = np.zeros((n, len(FEATURES)))
    features[:, 0] = rng.random(n) < 0.5  # an old signal, learnable from the start
    late = np.arange(n) >= int(0.8 * n)
    features[late, 2] = rng.random(int(late.sum())) < 0.5
    p = np.where(features[:, 2] == 1, 0.95, np.where(features[:, 0] == 1, 0.3, 0.05))
    grade = np.where(rng.random(n) < p, 2, 0)
    data = _log(features, grade)

    kept = train_from_log(data, _config(), progress=False)
    assert kept.holdout is None and kept.holdout_calibration is None
    assert kept.meta["refit"] is False

    refit = train_from_log(data, _config(refit=True), progress=False)
    assert refit.holdout is not None and refit.holdout_calibration is not None
    assert refit.meta["refit"] is True
    assert refit.split_us == kept.split_us
    best = refit.meta["best_iteration"]
    assert isinstance(best, int) and refit.booster.num_trees() == best
    # The twin is the early-stopped model trained before the split: the same as without refit.
    probe = np.zeros((3, len(FEATURES)))
    probe[1, 0] = 1.0
    probe[2, 2] = 1.0
    assert refit.holdout.predict(probe) == pytest.approx(kept.booster.predict(probe))
    before, after = refit.holdout.predict(probe), refit.booster.predict(probe)
    assert before[2] == pytest.approx(before[0])  # the new sort: unknown before the split
    assert after[2] > after[1] > after[0]
    # Calibration maps the refitted model's scores onto the completions of the whole log.
    assert refit.meta["calibration"] != refit.holdout_calibration
