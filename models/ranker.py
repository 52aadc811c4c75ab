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


class Ranker(Protocol):
    version: str
    kind: str

    def score(self, features: Matrix) -> npt.NDArray[np.float64]: ...


class RulePrior:
    """Ranks by the documented rule score (see ``models.features.rule_score``)."""

    version = "rules-v1"
    kind = "rules"

    def score(self, features: Matrix) -> npt.NDArray[np.float64]:
        return features[:, INDEX["rule_score"]].copy()


class LightGBMRanker:
    kind = "lightgbm"

    def __init__(self, booster: lgb.Booster, version: str) -> None:
        self._booster = booster
        self.version = version

    def score(self, features: Matrix) -> npt.NDArray[np.float64]:
        return np.asarray(self._booster.predict(features), dtype=np.float64)


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
    return LightGBMRanker(lgb.Booster(model_file=str(folder / "model.txt")), version)


def load_champion(registry: Path) -> Ranker:
    """The promoted model, or the rule prior when none has been promoted yet."""
    marker = registry / "CHAMPION"
    if not marker.exists():
        return RulePrior()
    return load_model(registry, marker.read_text().strip())
