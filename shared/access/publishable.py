"""Publishable widget keys (``nbv_pk_…``): what a page may hold for one person.

The customer's backend mints one for the person signed in to its app (``POST /v1/widget/keys``
with a decisions:read key) and hands it to the widget. It is stateless: the user id and expiry,
signed with NBV_SIGNING_SECRET by the same token code as the email links (a different kind, so
neither can pass for the other). It opens only that person's inbox, live stream, preferences
and responses.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field

from shared.envelope import Identifier
from shared.signing import BadToken, sign_token, verify_token

PUBLISHABLE_PREFIX = "nbv_pk_"
_KIND = "widget"
MAX_TTL_S = 86_400


class ExpiredKey(Exception):
    pass


@dataclass(frozen=True)
class WidgetGrant:
    user_id: str
    expires_at: datetime


class WidgetKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Identifier
    ttl_s: int = Field(default=3_600, ge=60, le=MAX_TTL_S, description="lifetime in seconds")


class WidgetKey(BaseModel):
    key: str = Field(description="give it to the widget (data-key); it opens only this user")
    user_id: str
    expires_at: datetime


def mint(secret: bytes, user_id: str, expires_at: datetime) -> str:
    claims = {"k": _KIND, "us": user_id, "exp": int(expires_at.timestamp())}
    return PUBLISHABLE_PREFIX + sign_token(secret, claims)


def read(secret: bytes, key: str, now: datetime) -> WidgetGrant:
    """The grant a publishable key carries; ``BadToken`` if it is not one NBV signed,
    ``ExpiredKey`` once it has expired."""
    if not key.startswith(PUBLISHABLE_PREFIX):
        raise BadToken("not a publishable key")
    claims = verify_token(secret, key.removeprefix(PUBLISHABLE_PREFIX))
    user_id, exp = claims.get("us"), claims.get("exp")
    if claims.get("k") != _KIND or not isinstance(user_id, str) or not isinstance(exp, int):
        raise BadToken("not a publishable key")
    expires_at = datetime.fromtimestamp(exp, UTC)
    if expires_at <= now:
        raise ExpiredKey(f"expired at {expires_at.isoformat()}")
    return WidgetGrant(user_id, expires_at)
