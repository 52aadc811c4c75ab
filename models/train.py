"""Training a LightGBM lambdarank model from logged decisions (one query per decision)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from models.features import FEATURES


def train_ranker(
    features: npt.NDArray[np.float64],
    labels: npt.NDArray[np.float64],
    groups: Sequence[int],
    *,
    num_trees: int = 200,
    seed: int = 7,
) -> lgb.Booster:
    """Fit a lambdarank booster; ``groups`` gives the size of each decision's candidate list."""
    if features.shape[1] != len(FEATURES):
        raise ValueError(f"expected {len(FEATURES)} feature columns, got {features.shape[1]}")
    if sum(groups) != features.shape[0]:
        raise ValueError("group sizes do not add up to the number of rows")
    dataset = lgb.Dataset(features, label=labels, group=list(groups), feature_name=list(FEATURES))
    params = {
        "objective": "lambdarank",
        "metric": "ndcg",
        "ndcg_eval_at": [1, 3],
        "learning_rate": 0.05,
        # The shape `nbv model train` fits by default (models/configs/default.yaml). Small,
        # shallow trees also keep SHAP explanations (pred_contrib, cost ∝ leaves × depth²)
        # cheap enough for the serving path: one row of 200 trees costs about 1.2 ms at 31
        # leaves and depth 8, 0.55 ms at 15 leaves, 0.44 ms at 15 leaves and depth 6.
        "num_leaves": 15,
        "max_depth": 6,
        "min_data_in_leaf": 20,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": 2,
        "verbosity": -1,
    }
    return lgb.train(params, dataset, num_boost_round=num_trees)


def training_meta(rows: int, queries: int) -> dict[str, object]:
    return {"trained_at": datetime.now(UTC).isoformat(), "rows": rows, "queries": queries}


def fit_calibration(
    scores: npt.NDArray[np.float64], labels: npt.NDArray[np.float64]
) -> dict[str, float]:
    """Platt scaling of ranker scores into P(success): a logistic fit label ~ σ(a·score + b).

    Lambdarank scores only order candidates within a query; this maps them onto the observed
    success rate so arbitration can multiply them by value weight and lever.
    """
    from sklearn.linear_model import LogisticRegression

    positives = labels > 0
    if positives.all() or not positives.any():
        rate = float(positives.mean()) if len(labels) else 0.5
        rate = min(max(rate, 1e-3), 1 - 1e-3)
        return {"slope": 0.0, "intercept": float(np.log(rate / (1 - rate)))}
    model = LogisticRegression(C=1e4, max_iter=200)
    model.fit(scores.reshape(-1, 1), positives.astype(int))
    return {"slope": float(model.coef_[0][0]), "intercept": float(model.intercept_[0])}
