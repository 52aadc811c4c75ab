"""Keeps the decision engine serving what the registry assigns: polls the assignment (one cheap
query), loads a newly assigned booster in a worker thread, then swaps the engine's models in
one reference assignment. A decision reads that reference once, so requests in flight finish
on the models they started with and none waits for a load."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from models.ranker import Ranker, RulePrior
from models.registry_store import (
    Assignment,
    build_ranker,
    current_assignment,
    load_ranker_artifact,
)
from models.routing import ServingModels
from shared.metrics import MODEL_INFO, MODEL_TRAFFIC_SHARE

log = logging.getLogger(__name__)


def publish_metrics(models: ServingModels) -> None:
    """What serves, for dashboards: one info series per role, and each version's share."""
    MODEL_INFO.clear()
    MODEL_TRAFFIC_SHARE.clear()
    champion, challenger = models.champion, models.challenger
    MODEL_INFO.labels(champion.version, champion.kind, "champion").set(1)
    share = models.share if challenger is not None else 0.0
    MODEL_TRAFFIC_SHARE.labels(champion.version, "champion").set(1.0 - share)
    if challenger is not None:
        MODEL_INFO.labels(challenger.version, challenger.kind, "challenger").set(1)
        MODEL_TRAFFIC_SHARE.labels(challenger.version, "challenger").set(share)


class ModelLoader:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        get: Callable[[], ServingModels],
        put: Callable[[ServingModels], None],
    ) -> None:
        self._sessions = sessions
        self._get = get
        self._put = put
        self._applied: tuple[str | None, str | None, float, str] = (None, None, 0.0, "")
        # The poll and an admin change may refresh at once; one at a time, so an older
        # assignment read first can never be swapped in after a newer one.
        self._lock = asyncio.Lock()

    async def refresh(self) -> bool:
        """Apply the assignment in force if it differs from what serves; True if swapped.
        Raises if a model cannot be loaded: the current models keep serving."""
        async with self._lock:
            async with self._sessions() as session:
                wanted = await current_assignment(session)
            key = (wanted.champion, wanted.challenger, wanted.challenger_share, wanted.salt)
            if key == self._applied:
                return False
            before = self._get()
            models = ServingModels(
                await self._ranker(wanted.champion, before),
                await self._ranker(wanted.challenger, before) if wanted.challenger else None,
                wanted.challenger_share,
                wanted.salt,
            )
            self._put(models)  # the swap: one reference assignment
            self._applied = key
            publish_metrics(models)
        log.info("models swapped", extra=_describe(wanted, before))
        return True

    async def _ranker(self, version: str | None, serving: ServingModels) -> Ranker:
        if version is None:
            return RulePrior()
        # Already loaded (e.g. the challenger being promoted): no second parse.
        for ranker in (serving.champion, serving.challenger):
            if ranker is not None and ranker.version == version:
                return ranker
        async with self._sessions() as session:
            artifact = await load_ranker_artifact(session, version)
        # Parsing a booster is CPU-bound; LightGBM releases the GIL while it works.
        return await asyncio.to_thread(build_ranker, version, artifact)


def _describe(wanted: Assignment, before: ServingModels) -> dict[str, object]:
    return {
        "assignment": wanted.id,
        "from": before.champion.version,
        "to": wanted.champion_version,
        "challenger": wanted.challenger,
        "share": wanted.challenger_share,
    }
