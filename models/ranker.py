"""The ranker slot: a rule prior until a trained LightGBM model is promoted in the registry.

Registry layout (``models/registry`` by default)::

    <version>/model.txt     LightGBM booster (text format)
    <version>/meta.json     {"version", "features", "trained_at", ...}
    CHAMPION                the version being served
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from models.features import FEATURES, INDEX

Matrix = npt.NDArray[np.float64]
Vector = npt.NDArray[np.float64]


class Ranker(Protocol):
    version: str
    kind: str

    def score(self, features: Matrix) -> npt.NDArray[np.float64]: ...

    def p_success(self, features: Matrix, scores: npt.NDArray[np.float64]) -> Vector: ...

    def contributions(self, features: Matrix) -> Matrix | None: ...


def _sigmoid(x: Vector) -> Vector:
    return np.asarray(1.0 / (1.0 + np.exp(-x)), dtype=np.float64)


class RulePrior:
    """Ranks by the documented rule score (see ``models.features.rule_score``)."""

    version = "rules-v1"
    kind = "rules"

    def score(self, features: Matrix) -> npt.NDArray[np.float64]:
        return features[:, INDEX["rule_score"]].copy()

    def p_success(self, features: Matrix, scores: Vector) -> Vector:
        """The prior's odds o = rule_score ÷ value weight, as a probability o / (1 + o)."""
        weight = features[:, INDEX["value_weight"]]
        odds = np.divide(scores, weight, out=np.zeros_like(scores), where=weight > 0)
        return np.asarray(odds / (1.0 + odds), dtype=np.float64)

    def contributions(self, features: Matrix) -> Matrix | None:
        return None  # the prior explains itself by its factors (models.features.prior_factors)


class LightGBMRanker:
    kind = "lightgbm"

    def __init__(
        self, booster: lgb.Booster, version: str, slope: float = 1.0, intercept: float = 0.0
    ) -> None:
        self._booster = booster
        self.version = version
        self.slope = slope
        self.intercept = intercept

    def score(self, features: Matrix) -> npt.NDArray[np.float64]:
        # One thread: the rows of one decision are few, and OpenMP's thread team costs more
        # (in CPU burnt spinning) than it saves; concurrency comes from serving many requests.
        return np.asarray(self._booster.predict(features, num_threads=1), dtype=np.float64)

    def p_success(self, features: Matrix, scores: Vector) -> Vector:
        """Platt scaling fitted at training time (meta ``calibration``): σ(a·score + b)."""
        return _sigmoid(self.slope * scores + self.intercept)

    def contributions(self, features: Matrix) -> Matrix | None:
        """Per-feature SHAP contributions (last column: the bias), one row per input row."""
        return np.asarray(
            self._booster.predict(features, pred_contrib=True, num_threads=1), dtype=np.float64
        )


class ModelError(RuntimeError):
    pass


def save_model(booster: lgb.Booster, registry: Path, version: str, meta: dict[str, object]) -> Path:
    target = registry / version
    target.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(target / "model.txt"))
    (target / "meta.json").write_text(
        json.dumps({**meta, "version": version, "features": list(FEATURES)}, indent=2)
    )
    return target


def promote(registry: Path, version: str) -> None:
    if not (registry / version / "model.txt").exists():
        raise ModelError(f"no model {version!r} in {registry}")
    tmp = registry / "CHAMPION.tmp"
    tmp.write_text(version)
    tmp.replace(registry / "CHAMPION")  # atomic: readers see the old or the new name


def load_model(registry: Path, version: str) -> LightGBMRanker:
    folder = registry / version
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("features") != list(FEATURES):
        raise ModelError(f"model {version!r} was trained on other features than this code builds")
    calibration = meta.get("calibration") or {}
    return LightGBMRanker(
        lgb.Booster(model_file=str(folder / "model.txt")),
        version,
        slope=float(calibration.get("slope", 1.0)),
        intercept=float(calibration.get("intercept", 0.0)),
    )


def champion_version(registry: Path) -> str | None:
    marker = registry / "CHAMPION"
    try:
        return marker.read_text().strip() or None
    except FileNotFoundError:
        return None


def load_champion(registry: Path) -> Ranker:
    """The promoted model, or the rule prior when none has been promoted yet."""
    version = champion_version(registry)
    if version is None:
        return RulePrior()
    return load_model(registry, version)
