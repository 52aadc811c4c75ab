"""Exploration: which ranked candidates are shown, and with what probability.

ε-greedy (default): slot by slot, the best remaining candidate is taken with probability
1 − ε, otherwise one of the remaining candidates uniformly at random; or softmax (below).
The logged propensity of each shown item is the probability this policy had of putting it in
that slot, which keeps off-policy evaluation and retraining unbiased.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Pick:
    index: int
    propensity: float


class EpsilonGreedy:
    def __init__(self, epsilon: float, rng: random.Random | None = None) -> None:
        if not 0 <= epsilon <= 1:
            raise ValueError("epsilon must be within [0, 1]")
        self.epsilon = epsilon
        self._rng = rng or random.Random()

    @property
    def name(self) -> str:
        return f"epsilon-greedy({self.epsilon:g})"

    def choose(self, scores: Sequence[float], k: int) -> list[Pick]:
        remaining = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        picks: list[Pick] = []
        while remaining and len(picks) < k:
            n = len(remaining)
            explore = self._rng.random() < self.epsilon
            position = self._rng.randrange(n) if explore else 0
            chosen = remaining.pop(position)
            greedy_share = (1 - self.epsilon) if position == 0 else 0.0
            picks.append(Pick(chosen, greedy_share + self.epsilon / n))
        return picks


class Softmax:
    """Plackett–Luce sampling: slot by slot, candidate i of the remaining ones is drawn with
    probability exp(sᵢ/T) / Σ exp(sⱼ/T). The logged propensity is that slot probability.

    Scores are arbitration scores (≈ P(success) × value × lever, within [0, a few]), so the
    temperature is on that scale: T → 0 is greedy, a large T is uniform.
    """

    def __init__(self, temperature: float, rng: random.Random | None = None) -> None:
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.temperature = temperature
        self._rng = rng or random.Random()

    @property
    def name(self) -> str:
        return f"softmax({self.temperature:g})"

    def choose(self, scores: Sequence[float], k: int) -> list[Pick]:
        remaining = list(range(len(scores)))
        picks: list[Pick] = []
        while remaining and len(picks) < k:
            top = max(scores[i] for i in remaining)
            weights = [math.exp((scores[i] - top) / self.temperature) for i in remaining]
            total = sum(weights)
            draw = self._rng.random() * total
            position = len(remaining) - 1
            for j, w in enumerate(weights):
                draw -= w
                if draw < 0:
                    position = j
                    break
            picks.append(Pick(remaining[position], weights[position] / total))
            remaining.pop(position)
        return picks


class Exploration(Protocol):
    @property
    def name(self) -> str: ...

    def choose(self, scores: Sequence[float], k: int) -> list[Pick]: ...


def make_policy(kind: str, epsilon: float, temperature: float, seed: int | None) -> Exploration:
    rng = random.Random(seed)
    if kind == "softmax":
        return Softmax(temperature, rng)
    return EpsilonGreedy(epsilon, rng)
