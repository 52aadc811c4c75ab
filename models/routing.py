"""Which model scores a person's decision: the champion, or for a stable share of people the
challenger, so a data scientist can compare the two on live traffic."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from models.ranker import Ranker, RulePrior

_SCALE = float(2**64)


def bucket(user_id: str, salt: str) -> float:
    """A uniform number in [0, 1) fixed by (salt, user id): one person stays in one arm for as
    long as the salt stays, and a new salt draws new arms. Not secret, only well mixed."""
    digest = hashlib.blake2b(f"{salt}\x00{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


@dataclass(frozen=True)
class ServingModels:
    """The models being served, replaced as a whole (one reference swap) when they change."""

    champion: Ranker
    challenger: Ranker | None = None
    share: float = 0.0
    salt: str = ""

    @classmethod
    def rules(cls) -> ServingModels:
        return cls(RulePrior())

    def for_user(self, user_id: str) -> Ranker:
        # Buckets below the share go to the challenger, so raising the share keeps everyone
        # already on the challenger there and only adds people.
        if self.challenger is not None and bucket(user_id, self.salt) < self.share:
            return self.challenger
        return self.champion
