"""Exploration: which ranked candidates are shown, and with what probability.

Slot by slot, the best remaining candidate is taken with probability 1 − ε, otherwise one of
the remaining candidates uniformly at random. The logged propensity of each shown item is the
probability this policy had of putting it in that slot, which keeps off-policy evaluation and
retraining unbiased.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


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
