"""Config-driven ranker training: time-based split, early stopping, progress bar, a seed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightgbm as lgb
import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from models.evaluate import TargetPolicy
from models.features import FEATURES
from models.logdata import GroupBy, LogData, utc
from models.ranker import save_model
from models.train import fit_calibration

# The objectives that learn P(label > 0), and the loss early stopping watches for each.
LOSS = {"binary": "binary_logloss", "cross_entropy": "cross_entropy", "xentropy": "cross_entropy"}
PROBABILISTIC = frozenset(LOSS)


class EvaluateConfig(BaseModel):
    """The policy whose value the off-policy estimates are of: the model served with this
    exploration (set it as the decision service's ``NBV_EXPLORATION_*``)."""

    model_config = ConfigDict(extra="forbid")

    target_policy: Literal["epsilon_greedy", "softmax"] = "epsilon_greedy"
    target_epsilon: float = Field(default=0.1, ge=0, le=1)
    target_temperature: float = Field(default=0.1, gt=0)
    # Also report DR with weights above this left to the reward model (None: not reported).
    dr_weight_cap: float | None = Field(default=None, gt=1)
    bootstrap: int = Field(default=500, ge=10)
    k: int = Field(default=3, ge=1)

    def target(self) -> TargetPolicy:
        return TargetPolicy(self.target_policy, self.target_epsilon, self.target_temperature)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = 7
    valid_fraction: float = Field(default=0.25, gt=0, lt=1)
    group_by: GroupBy = "user"
    num_boost_round: int = Field(default=300, ge=1)
    early_stopping_rounds: int = Field(default=30, ge=1)
    eval_at: list[int] = Field(default_factory=lambda: [1, 3])
    params: dict[str, Any] = Field(default_factory=dict)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return cls.model_validate(yaml.safe_load(path.read_text()) or {})

    def lgb_params(self) -> dict[str, Any]:
        # The seed and determinism flags are not optional: the same data and config must give
        # the same model, bit for bit.
        objective = str(self.params.get("objective", "lambdarank"))
        return {
            "objective": "lambdarank",
            # Early stopping watches the first metric. A probabilistic objective is stopped on
            # its own loss on the held-out rows: NDCG over a few cards per query is so noisy
            # there that the first tree often scores best by chance and the model stops at one.
            "metric": LOSS.get(objective, "ndcg"),
            "verbosity": -1,
            **self.params,
            "eval_at": self.eval_at,
            "seed": self.seed,
            "deterministic": True,
            "force_row_wise": True,
            "num_threads": int(self.params.get("num_threads", 2)),
        }


@dataclass(frozen=True)
class Trained:
    booster: lgb.Booster
    split_us: int
    meta: dict[str, object]


def _progress(total: int, enabled: bool) -> Any:
    bar = tqdm(total=total, desc="boosting", unit="tree", disable=not enabled, leave=False)

    def callback(env: lgb.callback.CallbackEnv) -> None:
        bar.update(1)
        if env.evaluation_result_list:
            _, metric, value, _ = env.evaluation_result_list[-1][:4]
            bar.set_postfix({metric: f"{value:.4f}"})
        if env.iteration + 1 >= env.end_iteration:
            bar.close()

    return callback


def train_from_log(data: LogData, config: TrainConfig, *, progress: bool = True) -> Trained:
    split = data.split_time(config.valid_fraction)
    train, train_groups = data.take(data.decided_at < split).ranking_queries(config.group_by)
    valid, valid_groups = data.take(data.decided_at >= split).ranking_queries(config.group_by)
    if not train_groups or not valid_groups:
        raise ValueError("not enough shown rows on both sides of the time split to train")
    names = list(FEATURES)
    # A probabilistic objective learns P(label > 0): that must be P(completed), the reward, not
    # the relevance grade (LightGBM's binary objective takes a click, grade 1, as a success).
    pointwise = config.lgb_params()["objective"] in PROBABILISTIC
    y_train = (train.reward > 0).astype(np.float64) if pointwise else train.label
    y_valid = (valid.reward > 0).astype(np.float64) if pointwise else valid.label
    dtrain = lgb.Dataset(train.features, y_train, group=train_groups, feature_name=names)
    dvalid = lgb.Dataset(
        valid.features, y_valid, group=valid_groups, feature_name=names, reference=dtrain
    )
    booster = lgb.train(
        config.lgb_params(),
        dtrain,
        num_boost_round=config.num_boost_round,
        valid_sets=[dvalid],
        valid_names=["valid"],
        callbacks=[
            lgb.early_stopping(config.early_stopping_rounds, verbose=False),
            _progress(config.num_boost_round, progress),
        ],
    )
    # Arbitration multiplies P(success) by value and lever: map scores onto completions.
    scores = np.asarray(booster.predict(train.features), dtype=np.float64)
    calibration = fit_calibration(scores, (train.reward > 0).astype(np.float64))
    meta: dict[str, object] = {
        "trained_at": utc(int(np.max(data.decided_at))).isoformat(),
        "rows": len(train),
        "queries": len(train_groups),
        "valid_rows": len(valid),
        "valid_queries": len(valid_groups),
        "data_from": utc(int(np.min(data.decided_at))).isoformat(),
        "data_until": utc(int(np.max(data.decided_at))).isoformat(),
        "split_at": utc(split).isoformat(),
        "best_iteration": int(booster.best_iteration or booster.current_iteration()),
        "config": config.model_dump(mode="json"),
        "calibration": calibration,
        "objective": config.lgb_params()["objective"],
    }
    return Trained(booster, split, meta)


def save_trained(trained: Trained, registry: Path, version: str) -> Path:
    return save_model(trained.booster, registry, version, trained.meta)
