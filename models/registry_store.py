"""The model registry of record, in the store: every registered version (its LightGBM text,
what it was trained on, how it evaluated) and the serving assignment (champion, optional
challenger with its traffic share), kept as a history of changes so a rollback knows what
served before.

Rollback works like undo: a promote remembers the assignment it replaced; a rollback restores
that assignment's champion and inherits *its* memory, so rolling back twice after two promotes
returns to the champion before both, and past the first promote to the rule prior.

Every function takes a session inside the caller's transaction; a change that races another
(two promotes at once) fails with ``Conflict`` rather than silently overwriting it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightgbm as lgb
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from models.features import FEATURES
from models.ranker import (
    LightGBMRanker,
    ModelError,
    RulePrior,
    feature_mismatch,
    ranker_from_text,
    read_working_copy,
)
from shared.store.db import create_engine, migrate, session_factory
from shared.store.models import ModelAssignment, ModelVersion

log = logging.getLogger(__name__)

VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
_VERSION_RE = re.compile(VERSION_PATTERN)


class RegistryError(Exception):
    """A registry operation refused, with a message meant for the person who asked."""


class UnknownVersion(RegistryError):
    pass


class Refused(RegistryError):
    """The request is understood but cannot be done (wrong features, nothing to roll back)."""


class Conflict(RegistryError):
    """Someone else changed the same thing meanwhile, or the name is taken by another model."""


class Assignment(BaseModel):
    """Which models serve, and who made it so."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    champion: str | None
    challenger: str | None
    challenger_share: float
    salt: str
    action: str
    changed_by: str
    changed_at: datetime | None
    reason: str
    rollback_to: int | None

    @property
    def champion_version(self) -> str:
        """The champion as decisions report it (the rule prior's version when none)."""
        return self.champion or RulePrior.version


INITIAL = Assignment(
    id=0,
    champion=None,
    challenger=None,
    challenger_share=0.0,
    salt="",
    action="initial",
    changed_by="",
    changed_at=None,
    reason="",
    rollback_to=None,
)


class ModelVersionInfo(BaseModel):
    version: str
    status: str
    created_at: datetime
    registered_by: str
    trained_at: datetime | None
    data_from: datetime | None
    data_until: datetime | None
    feature_count: int
    features_match: bool
    model_sha256: str
    headline: dict[str, float | None]
    meta: dict[str, Any]
    evaluation: dict[str, Any] | None


# ------------------------------------------------------------------ helpers


def _json_safe(value: Any) -> Any:
    """NaN and ±inf as null: PostgreSQL's JSONB refuses them (evaluation metrics can be NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _when(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def headline(meta: dict[str, Any], evaluation: dict[str, Any] | None) -> dict[str, float | None]:
    """The few numbers to compare versions by: ranking quality on the held-out period and
    the off-policy value (doubly robust) against the logged policy's."""
    out: dict[str, float | None] = {"rows": _number(meta.get("rows"))}
    if evaluation:
        ranking = evaluation.get("ranking") or {}
        for name, value in ranking.items():
            if name.startswith("ndcg@") or name == "map":
                out[name] = _number(value)
        off = evaluation.get("off_policy") or {}
        out["dr"] = _number((off.get("dr") or {}).get("estimate"))
        out["logged"] = _number((off.get("logged_value") or {}).get("estimate"))
    return out


def _info(row: ModelVersion) -> ModelVersionInfo:
    return ModelVersionInfo(
        version=row.version,
        status=row.status,
        created_at=row.created_at,
        registered_by=row.registered_by,
        trained_at=row.trained_at,
        data_from=row.data_from,
        data_until=row.data_until,
        feature_count=len(row.features),
        features_match=feature_mismatch(row.features) is None,
        model_sha256=row.model_sha256,
        headline=headline(row.meta, row.evaluation),
        meta={k: v for k, v in row.meta.items() if k != "features"},
        evaluation=row.evaluation,
    )


def check_version_name(version: str) -> None:
    if not _VERSION_RE.match(version):
        raise Refused(
            f"version {version!r}: use 1–100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if version == RulePrior.version:
        raise Refused(f"version {version!r} is the rule prior's name; choose another")


# ------------------------------------------------------------------ versions


async def register(
    session: AsyncSession,
    version: str,
    model_text: str,
    meta: dict[str, Any],
    *,
    by: str,
    evaluation: dict[str, Any] | None = None,
) -> tuple[ModelVersionInfo, bool]:
    """Store a trained model; (its info, whether it is new). A version is immutable: the same
    artifact again only refreshes its evaluation, another artifact under its name is refused."""
    check_version_name(version)
    if not model_text.strip():
        raise Refused(f"model {version!r} has an empty model text")
    digest = hashlib.sha256(model_text.encode()).hexdigest()
    safe_eval = _json_safe(evaluation) if evaluation is not None else None
    existing = await session.get(ModelVersion, version)
    if existing is not None:
        if existing.model_sha256 != digest:
            raise Conflict(
                f"version {version!r} is already registered with another model "
                f"(sha256 {existing.model_sha256[:12]}…); versions are immutable, "
                "train under a new name"
            )
        if safe_eval is not None:
            existing.evaluation = safe_eval
        return _info(existing), False
    try:
        # Parsed once here (off the loop), so a promote never assigns a model no replica loads.
        await asyncio.to_thread(lgb.Booster, model_str=model_text)
    except lgb.basic.LightGBMError as exc:
        raise Refused(f"model {version!r} is not a LightGBM model text: {exc}") from None
    features = meta.get("features")
    row = ModelVersion(
        version=version,
        created_at=datetime.now(UTC),
        registered_by=by,
        trained_at=_when(meta.get("trained_at")),
        data_from=_when(meta.get("data_from")),
        data_until=_when(meta.get("data_until")),
        features=[str(f) for f in features] if isinstance(features, list) else [],
        meta=_json_safe({k: v for k, v in meta.items() if k not in ("features", "version")}),
        evaluation=safe_eval,
        model_text=model_text,
        model_sha256=digest,
        status="candidate",
    )
    session.add(row)
    try:
        await session.flush()
    except IntegrityError:
        raise Conflict(f"version {version!r} was registered concurrently; retry") from None
    log.info("model registered", extra={"version": version, "by": by})
    return _info(row), True


async def register_folder(
    session: AsyncSession, registry: Path, version: str, *, by: str
) -> tuple[ModelVersionInfo, bool]:
    """Register the working copy ``<registry>/<version>`` (with its evaluation, if any)."""
    try:
        text, meta = read_working_copy(registry, version)
    except ModelError as exc:
        raise UnknownVersion(str(exc)) from None
    evaluation_file = registry / version / "evaluation.json"
    evaluation = json.loads(evaluation_file.read_text()) if evaluation_file.exists() else None
    return await register(session, version, text, meta, by=by, evaluation=evaluation)


async def set_evaluation(session: AsyncSession, version: str, evaluation: dict[str, Any]) -> bool:
    """Attach an evaluation report to a registered version; False if it is not registered."""
    done = await session.execute(
        update(ModelVersion)
        .where(ModelVersion.version == version)
        .values(evaluation=_json_safe(evaluation))
    )
    return bool(getattr(done, "rowcount", 0))


async def list_versions(session: AsyncSession) -> list[ModelVersionInfo]:
    rows = await session.scalars(select(ModelVersion).order_by(ModelVersion.created_at.desc()))
    return [_info(r) for r in rows]


async def _version(session: AsyncSession, version: str) -> ModelVersion:
    row = await session.get(ModelVersion, version)
    if row is None:
        known = list(
            await session.scalars(
                select(ModelVersion.version).order_by(ModelVersion.created_at.desc()).limit(10)
            )
        )
        hint = f"registered: {', '.join(known)}" if known else "none is registered yet"
        raise UnknownVersion(
            f"unknown model version {version!r} ({hint}; `nbv model register VERSION` adds one)"
        )
    return row


def _check_servable(row: ModelVersion) -> None:
    why = feature_mismatch(row.features)
    if why is not None:
        raise Refused(
            f"model {row.version!r} cannot serve: it was trained on {len(row.features)} features "
            f"and this service builds {len(FEATURES)}; {why}. Retrain it on a current export."
        )


async def load_ranker_artifact(session: AsyncSession, version: str) -> tuple[str, dict[str, Any]]:
    """(model text, meta with its features) of a registered version, for ``ranker_from_text``."""
    found = (
        await session.execute(
            select(ModelVersion.model_text, ModelVersion.meta, ModelVersion.features).where(
                ModelVersion.version == version
            )
        )
    ).first()
    if found is None:
        raise UnknownVersion(f"unknown model version {version!r}")
    text, meta, features = found
    return text, {**meta, "features": features}


def build_ranker(version: str, artifact: tuple[str, dict[str, Any]]) -> LightGBMRanker:
    """Parse the booster (CPU-bound: run it in a worker thread)."""
    text, meta = artifact
    return ranker_from_text(text, version, meta)


# ------------------------------------------------------------------ the serving assignment


async def current_assignment(session: AsyncSession) -> Assignment:
    """The assignment in force (the rule prior alone when nothing was ever assigned). One
    primary-key lookup: cheap enough to poll."""
    row = await session.scalar(select(ModelAssignment).order_by(ModelAssignment.id.desc()).limit(1))
    return INITIAL if row is None else Assignment.model_validate(row)


async def history(session: AsyncSession, limit: int = 20) -> list[Assignment]:
    rows = await session.scalars(
        select(ModelAssignment).order_by(ModelAssignment.id.desc()).limit(limit)
    )
    return [Assignment.model_validate(r) for r in rows]


async def _change(
    session: AsyncSession,
    current: Assignment,
    *,
    champion: str | None,
    challenger: str | None,
    share: float,
    salt: str,
    action: str,
    by: str,
    reason: str,
    rollback_to: int | None,
) -> Assignment:
    row = ModelAssignment(
        # current + 1, not a sequence: two changes made from the same state collide on the
        # key, so the second fails instead of overwriting the first unseen.
        id=current.id + 1,
        champion=champion,
        challenger=challenger,
        challenger_share=share if challenger else 0.0,
        salt=salt if challenger else "",
        action=action,
        changed_by=by,
        changed_at=datetime.now(UTC),
        reason=reason,
        rollback_to=rollback_to,
    )
    session.add(row)
    touched = {current.champion, current.challenger, champion, challenger} - {None}
    try:
        await session.flush()
        for version in touched:
            status = (
                "champion"
                if version == champion
                else "challenger"
                if version == challenger
                else "retired"
            )
            await session.execute(
                update(ModelVersion).where(ModelVersion.version == version).values(status=status)
            )
    except IntegrityError:
        raise Conflict(
            "the serving assignment changed meanwhile (another promote, rollback or challenger "
            "change); look at `nbv model list` and retry"
        ) from None
    out = Assignment.model_validate(row)
    log.info(
        "model assignment changed",
        extra={
            "action": action,
            "champion": out.champion_version,
            "challenger": challenger,
            "share": out.challenger_share,
            "by": by,
        },
    )
    return out


async def promote(session: AsyncSession, version: str, *, by: str, reason: str = "") -> Assignment:
    """Make ``version`` the champion (a no-op if it already is). A challenger that is promoted
    stops being the challenger; another challenger keeps its share."""
    current = await current_assignment(session)
    _check_servable(await _version(session, version))
    if current.champion == version:
        return current
    keep = current.challenger if current.challenger != version else None
    return await _change(
        session,
        current,
        champion=version,
        challenger=keep,
        share=current.challenger_share,
        salt=current.salt,
        action="promote",
        by=by,
        reason=reason,
        rollback_to=current.id or None,
    )


async def rollback(session: AsyncSession, *, by: str, reason: str = "") -> Assignment:
    """Back to the champion before the current one (the rule prior if there was none)."""
    current = await current_assignment(session)
    if current.champion is None and current.rollback_to is None:
        raise Refused("nothing to roll back: the rule prior is serving and no champion preceded it")
    target = (
        None
        if current.rollback_to is None
        else await session.get(ModelAssignment, current.rollback_to)
    )
    champion = target.champion if target else None
    if champion is not None:
        _check_servable(await _version(session, champion))
    keep = current.challenger if current.challenger != champion else None
    return await _change(
        session,
        current,
        champion=champion,
        challenger=keep,
        share=current.challenger_share,
        salt=current.salt,
        action="rollback",
        by=by,
        reason=reason,
        rollback_to=target.rollback_to if target else None,
    )


async def set_challenger(
    session: AsyncSession,
    version: str,
    share: float,
    *,
    by: str,
    reason: str = "",
    salt: str | None = None,
) -> Assignment:
    """Route ``share`` of people (by a hash of their user id) to ``version``. Changing only
    the share keeps the salt, so people already on the challenger stay there."""
    if not 0.0 < share < 1.0:
        raise Refused(f"share {share}: must be between 0 and 1 (exclusive); promote to serve all")
    current = await current_assignment(session)
    _check_servable(await _version(session, version))
    if version == current.champion:
        raise Refused(f"model {version!r} is the champion; a challenger must be another version")
    same = current.challenger == version
    salt = salt or (current.salt if same else version)
    if same and share == current.challenger_share and salt == current.salt:
        return current
    return await _change(
        session,
        current,
        champion=current.champion,
        challenger=version,
        share=share,
        salt=salt,
        action="challenger",
        by=by,
        reason=reason,
        rollback_to=current.rollback_to,
    )


async def clear_challenger(session: AsyncSession, *, by: str, reason: str = "") -> Assignment:
    current = await current_assignment(session)
    if current.challenger is None:
        return current
    return await _change(
        session,
        current,
        champion=current.champion,
        challenger=None,
        share=0.0,
        salt="",
        action="clear-challenger",
        by=by,
        reason=reason,
        rollback_to=current.rollback_to,
    )


# ------------------------------------------------------------------ for scripts and the CLI


@asynccontextmanager
async def registry_session(url: str, *, auto_migrate: bool = True) -> AsyncIterator[AsyncSession]:
    """One transaction on the store at ``url`` (created or brought up to date first)."""
    engine = create_engine(url)  # first: it makes the embedded store's folder
    try:
        if auto_migrate:
            await migrate(url)
        async with session_factory(engine)() as session, session.begin():
            yield session
    finally:
        await engine.dispose()


async def register_and_promote(url: str, registry: Path, version: str, *, by: str) -> Assignment:
    """Register the working copy ``<registry>/<version>`` and make it the champion."""
    async with registry_session(url) as session:
        await register_folder(session, registry, version, by=by)
        return await promote(session, version, by=by)
