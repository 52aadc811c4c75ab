"""Secret API keys (``nbv_sk_…``): made, stored, listed and revoked.

A key is 256 random bits; only its SHA-256 is stored. Nothing about such a key can be
brute-forced, so a fast hash is the right one (a slow password hash would only cost every
request), and a lookup is one indexed equality. The key itself is shown once, on creation.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from shared.access.scopes import Scope
from shared.settings import Settings
from shared.store.models import ApiKey, utcnow

log = logging.getLogger(__name__)

SECRET_PREFIX = "nbv_sk_"
# Characters of the random part kept for display ("nbv_sk_Ab3dE9…"): 36 of 256 bits, enough
# to tell keys apart, far too few to help guess one.
_DISPLAYED = 6


def generate() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")
    scopes: list[Scope] = Field(min_length=1, description="admin implies every other scope")
    rate_limit: float | None = Field(
        default=None,
        gt=0,
        le=1_000_000,
        description="requests per second, per process; default NBV_RATE_LIMIT_PER_S",
    )


class KeyOut(BaseModel):
    """A key as listed: never the key itself, nor its hash."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    prefix: str = Field(description="the key's first characters, to recognise it")
    scopes: list[Scope]
    rate_limit: float | None
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="the key itself: shown only this once, store it now")


async def create_key(session: AsyncSession, spec: KeyCreate) -> KeyCreated:
    key = generate()
    row = ApiKey(
        id=secrets.token_hex(8),
        name=spec.name,
        prefix=key[: len(SECRET_PREFIX) + _DISPLAYED],
        key_hash=digest(key),
        scopes=sorted({s.value for s in spec.scopes}),
        rate_limit=spec.rate_limit,
        created_at=utcnow(),
    )
    session.add(row)
    await session.flush()
    log.info(
        "api key created", extra={"key_id": row.id, "key_name": row.name, "scopes": row.scopes}
    )
    return KeyCreated(**KeyOut.model_validate(row).model_dump(), key=key)


async def list_keys(session: AsyncSession, *, include_revoked: bool = True) -> list[KeyOut]:
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return [KeyOut.model_validate(row) for row in await session.scalars(query)]


async def revoke_key(
    session: AsyncSession, key_id: str, at: datetime | None = None
) -> ApiKey | None:
    """Revoke a key (again is a no-op: it keeps its first revocation time); None if unknown."""
    row = await session.get(ApiKey, key_id)
    if row is None:
        return None
    if row.revoked_at is None:
        row.revoked_at = at or utcnow()
        await session.flush()
        log.info("api key revoked", extra={"key_id": row.id, "key_name": row.name})
    return row


async def find_key(session: AsyncSession, key_digest: str) -> ApiKey | None:
    row: ApiKey | None = await session.scalar(select(ApiKey).where(ApiKey.key_hash == key_digest))
    return row


async def mark_used(session: AsyncSession, key_id: str, at: datetime) -> None:
    await session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=at))


def client_key(settings: Settings) -> str | None:
    """The key NBV's own clients (`nbv ingest --url`, `nbv simulate`) send: NBV_API_KEY, else
    NBV_ADMIN_KEY."""
    return settings.api_key.get_secret_value() or settings.admin_key.get_secret_value() or None
