"""The world's hidden truth at each decision, written beside a run for offline analysis.

NBV never sees this. For every decision the simulator asked for, it records how likely the
person was, at that moment, to complete each element of the library had it been the card in
front of them (``respond_probabilities``' first figure, as the widget's first slot would get
it). Joined with the store's decision log (every eligible element of the decision), it scores
any ranking of the eligible elements against the best one, which is how a learner change can
be judged on the cards it *would* have chosen, not only on the few the log's policy showed
(``bench/replay.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TextIO

from pydantic import BaseModel

from models.simulator.world import Fit, Person, respond_probabilities


class TruthRecord(BaseModel):
    decision_id: str
    user_id: str
    week: int
    # element id → P(completed) of that element as the first card, for the person as they were.
    p_completed: dict[str, float]


def hidden_p(p: Person, fits: Mapping[str, Fit], weeks_to_renewal: int) -> dict[str, float]:
    return {
        element_id: round(respond_probabilities(p, element_id, fit, weeks_to_renewal)[0], 6)
        for element_id, fit in fits.items()
    }


class TruthLog:
    """An append-only JSON-lines file of ``TruthRecord``s."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO | None = None

    def write(self, record: TruthRecord) -> None:
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(record.model_dump_json() + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_truth(path: Path) -> Iterator[TruthRecord]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield TruthRecord.model_validate(json.loads(line))
