"""Config-driven ranker training: time-based split, early stopping, progress bar, a seed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from models.evaluate import TargetPolicy
from models.features import FEATURES
from models.logdata import GroupBy, LogData, utc
from models.ranker import save_model
from models.train import fit_calibration

# The objectives that learn P(label > 0), and the loss early stopping watches for each.
LOSS = {"binary": "binary_logloss", "cross_entropy": "cross_entropy", "xentropy": "cross_entropy"}
PROBABILISTIC = frozenset(LOSS)
# What a probabilistic objective learns (``TrainConfig.target``): the reward (completed), the
# person's engagement (completed or clicked), or the relevance grade as a probability (completed
# 1, clicked ½: only for ``cross_entropy``, whose labels may lie between 0 and 1).
Target = Literal["reward", "engaged", "grade"]


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
    # The label of a probabilistic objective (see ``Target``); lambdarank always learns the grade.
    target: Target = "reward"
    # Once early stopping has chosen the number of trees on the held-out period, fit that many
    # again on the whole log, held-out period included: the newest days are the most like the
    # week the model will serve, and the held-out quarter is a quarter of what there is to learn
    # from. The model fitted without them is kept (``Trained.holdout``) for an honest estimate on
    # the held-out period.
    refit: bool = False
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return cls.model_validate(yaml.safe_load(path.read_text()) or {})

    @model_validator(mode="after")
    def _target_fits_objective(self) -> TrainConfig:
        objective = str(self.params.get("objective", "lambdarank"))
        if self.target == "grade" and LOSS.get(objective) != "cross_entropy":
            raise ValueError("target: grade needs objective cross_entropy (labels 0, ½ and 1)")
        return self

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
    # With ``refit``: the model fitted before ``split_us`` only, and its calibration, to estimate
    # the refitted one's value on the held-out period it has not seen (None: ``booster`` is it).
    holdout: lgb.Booster | None = None
    holdout_calibration: dict[str, float] | None = None


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


def train_from_log(
    data: LogData,
    config: TrainConfig,
    *,
    progress: bool = True,
    label_of: Callable[[LogData], npt.NDArray[np.float64]] | None = None,
) -> Trained:
    """``label_of``: what each shown row teaches instead of ``labels`` (an analysis of what
    other labels would buy, e.g. the simulator's hidden truth in ``bench/replay.py``)."""
    split = data.split_time(config.valid_fraction)

    def label(rows: LogData) -> npt.NDArray[np.float64]:
        return labels(rows, config) if label_of is None else label_of(rows)

    train, train_groups = data.take(data.decided_at < split).ranking_queries(config.group_by)
    valid, valid_groups = data.take(data.decided_at >= split).ranking_queries(config.group_by)
    if not train_groups or not valid_groups:
        raise ValueError("not enough shown rows on both sides of the time split to train")
    names = list(FEATURES)
    dtrain = lgb.Dataset(train.features, label(train), group=train_groups, feature_name=names)
    dvalid = lgb.Dataset(
        valid.features,
        label(valid),
        group=valid_groups,
        feature_name=names,
        reference=dtrain,
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
    best = int(booster.best_iteration or booster.current_iteration())
    # Arbitration multiplies P(success) by value and lever: map scores onto completions.
    calibration = _calibration(booster, train)
    holdout, holdout_calibration = None, None
    if config.refit:
        everything, groups = data.ranking_queries(config.group_by)
        holdout, holdout_calibration = booster, calibration
        booster = lgb.train(
            config.lgb_params(),
            lgb.Dataset(
                everything.features,
                label(everything),
                group=groups,
                feature_name=names,
            ),
            num_boost_round=best,
        )
        calibration = _calibration(booster, everything)
    meta: dict[str, object] = {
        "trained_at": utc(int(np.max(data.decided_at))).isoformat(),
        "rows": len(train),
        "queries": len(train_groups),
        "valid_rows": len(valid),
        "valid_queries": len(valid_groups),
        "data_from": utc(int(np.min(data.decided_at))).isoformat(),
        "data_until": utc(int(np.max(data.decided_at))).isoformat(),
        "split_at": utc(split).isoformat(),
        "best_iteration": best,
        "config": config.model_dump(mode="json"),
        "calibration": calibration,
        "objective": config.lgb_params()["objective"],
        # Refitted on the held-out period too: evaluating this model there is not held out.
        "refit": config.refit,
    }
    return Trained(booster, split, meta, holdout, holdout_calibration)


def labels(rows: LogData, config: TrainConfig) -> npt.NDArray[np.float64]:
    """What the objective learns from each shown row. Lambdarank: the relevance grade. A
    probabilistic objective learns P(label): by default the reward (completed), never the
    grade as is (LightGBM's binary objective would take a click, grade 1, for a success)."""
    if config.lgb_params()["objective"] not in PROBABILISTIC:
        return rows.label
    if config.target == "engaged":
        return (rows.label > 0).astype(np.float64)
    if config.target == "grade":
        return np.clip(rows.label / 2.0, 0.0, 1.0)
    return (rows.reward > 0).astype(np.float64)


def _calibration(booster: lgb.Booster, rows: LogData) -> dict[str, float]:
    scores = np.asarray(booster.predict(rows.features), dtype=np.float64)
    return fit_calibration(scores, (rows.reward > 0).astype(np.float64))


def save_trained(trained: Trained, registry: Path, version: str) -> Path:
    return save_model(trained.booster, registry, version, trained.meta)
