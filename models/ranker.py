"""The ranker slot: a rule prior until a trained LightGBM model is promoted in the registry.

The registry of record is the store (``models.registry_store``: artifacts, metadata and which
version serves). A folder (``NBV_MODEL_DIR``, ``models/registry`` by default) is the data
scientist's working copy, where training writes and evaluation adds its report::

    <version>/model.txt     LightGBM booster (text format)
    <version>/meta.json     {"version", "features", "trained_at", "calibration", ...}
    <version>/evaluation.json, card.md, *.png   from ``nbv model evaluate``
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from models.compiled import compile_predictor
from models.features import FEATURES, INDEX
from models.treeshap import compile_tables

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
        # Every decision is explained, and pred_contrib re-runs TreeSHAP over all trees per
        # row; the tables do the row-independent part once, here (None: a model they can't
        # express, explained by pred_contrib).
        self._shap = compile_tables(booster)
        self._predict = compile_predictor(booster, version)

    def score(self, features: Matrix) -> npt.NDArray[np.float64]:
        if self._predict is not None:
            return self._predict(features)
        # One thread: the rows of one decision are few, and OpenMP's thread team costs more
        # (in CPU burnt spinning) than it saves; concurrency comes from serving many requests.
        return np.asarray(self._booster.predict(features, num_threads=1), dtype=np.float64)

    def p_success(self, features: Matrix, scores: Vector) -> Vector:
        """Platt scaling fitted at training time (meta ``calibration``): σ(a·score + b)."""
        return _sigmoid(self.slope * scores + self.intercept)

    def contributions(self, features: Matrix) -> Matrix | None:
        """Per-feature SHAP contributions (last column: the bias), one row per input row."""
        if self._shap is not None:
            return self._shap.contributions(features)
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


def feature_mismatch(features: object) -> str | None:
    """Why a model trained on ``features`` cannot serve with this code's features, or None."""
    if features == list(FEATURES):
        return None
    theirs = [str(f) for f in features] if isinstance(features, list) else []
    missing = [f for f in FEATURES if f not in theirs]
    extra = [f for f in theirs if f not in INDEX]
    if not missing and not extra:
        return "it has the same features in another column order"
    parts = []
    if missing:
        parts.append(f"lacks {', '.join(missing)}")
    if extra:
        parts.append(f"has unknown {', '.join(extra)}")
    return "it " + " and ".join(parts)


def ranker_from_text(model_text: str, version: str, meta: dict[str, Any]) -> LightGBMRanker:
    """A servable ranker from the booster's text and its meta (CPU-bound: call off the loop)."""
    why = feature_mismatch(meta.get("features"))
    if why is not None:
        raise ModelError(
            f"model {version!r} was trained on other features than this code builds: {why}"
        )
    calibration = meta.get("calibration") or {}
    return LightGBMRanker(
        lgb.Booster(model_str=model_text),
        version,
        slope=float(calibration.get("slope", 1.0)),
        intercept=float(calibration.get("intercept", 0.0)),
    )


def read_working_copy(registry: Path, version: str) -> tuple[str, dict[str, Any]]:
    """The model text and meta of ``<registry>/<version>``."""
    folder = registry / version
    try:
        text = (folder / "model.txt").read_text()
        meta = json.loads((folder / "meta.json").read_text())
    except FileNotFoundError as exc:
        raise ModelError(
            f"no model {version!r} in {registry} ({exc.filename} is missing)"
        ) from None
    if not isinstance(meta, dict):
        raise ModelError(f"{folder / 'meta.json'} is not a JSON object")
    return text, meta


def load_model(registry: Path, version: str) -> LightGBMRanker:
    """The working copy's model, e.g. to evaluate it before it is registered."""
    text, meta = read_working_copy(registry, version)
    return ranker_from_text(text, version, meta)
