"""The preference centre: which channels a person allows, quiet hours and opt-outs, and the
channel choice that honours them (pure functions; the store access is at the bottom)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.envelope import Channel, Identifier
from shared.store.db import upsert
from shared.store.models import ChannelPreference, utcnow


class QuietHours(BaseModel):
    """A daily window (may wrap midnight) in which no email is sent; mail waits for its end."""

    model_config = ConfigDict(extra="forbid")

    start: time
    end: time
    timezone: str | None = Field(
        default=None, description="IANA zone; defaults to the timezone in the person's view"
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown timezone {value!r}") from None
        return value

    @field_validator("end")
    @classmethod
    def _not_empty(cls, value: time, info: ValidationInfo) -> time:
        start = info.data.get("start")
        if start is not None and start == value:
            raise ValueError("end must differ from start")
        return value


class Preferences(BaseModel):
    model_config = ConfigDict(extra="forbid")

    channels: dict[Channel, bool] = Field(
        default_factory=dict, description="channel → allowed; a channel not listed is allowed"
    )
    quiet_hours: QuietHours | None = None
    opted_out_kinds: list[Annotated[str, Field(min_length=1, max_length=50)]] = Field(
        default_factory=list, description="element kinds never to receive (e.g. webinar)"
    )
    opted_out_elements: list[Identifier] = Field(default_factory=list)

    def allows(self, channel: Channel) -> bool:
        return self.channels.get(channel, True)


class PreferencesOut(Preferences):
    user_id: str
    updated_at: datetime | None = None


@dataclass(frozen=True)
class ChannelChoice:
    channel: Channel | None
    reason: str  # why not the requested channel (empty when it is used as requested)


def choose_channel(
    requested: Channel,
    element_channels: Sequence[Channel],
    *,
    kind: str | None,
    element_id: str,
    prefs: Preferences,
    has_email: bool,
    csm_configured: bool,
) -> ChannelChoice:
    """The requested channel if allowed, else the element's next allowed one; a person without
    an email address gets email elements in-app. None (skip) when nothing is allowed."""
    if element_id in prefs.opted_out_elements:
        return ChannelChoice(None, f"opted out of element {element_id}")
    if kind is not None and kind in prefs.opted_out_kinds:
        return ChannelChoice(None, f"opted out of {kind} elements")
    candidates = _unique([requested, *element_channels])
    if requested is Channel.EMAIL:
        candidates = _unique([*candidates, Channel.IN_APP])
    refused: list[str] = []
    for channel in candidates:
        if not prefs.allows(channel):
            refused.append(f"{channel.value} disabled by the person's preferences")
        elif channel is Channel.EMAIL and not has_email:
            refused.append("no email address in the person's view")
        elif channel is Channel.CSM and not csm_configured:
            refused.append("no CSM webhook configured")
        else:
            return ChannelChoice(channel, "; ".join(refused))
    return ChannelChoice(None, "; ".join(refused) or "no channel allowed")


def _unique(channels: Iterable[Channel]) -> list[Channel]:
    return list(dict.fromkeys(channels))


def quiet_until(
    quiet: QuietHours | None, fallback_tz: str | None, now: datetime
) -> datetime | None:
    """When the quiet window containing ``now`` ends (UTC), or None if ``now`` is not quiet."""
    if quiet is None:
        return None
    try:
        zone = ZoneInfo(quiet.timezone or fallback_tz or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        zone = ZoneInfo("UTC")
    local = now.astimezone(zone)
    t = local.time().replace(tzinfo=None)
    wraps = quiet.start > quiet.end
    inside = (quiet.start <= t or t < quiet.end) if wraps else (quiet.start <= t < quiet.end)
    if not inside:
        return None
    end_day = local.date() + timedelta(days=1) if wraps and t >= quiet.start else local.date()
    end_local = datetime.combine(end_day, quiet.end, tzinfo=zone)
    return end_local.astimezone(UTC)


async def load_preferences(
    session: AsyncSession, user_ids: Iterable[str]
) -> dict[str, Preferences]:
    rows = await session.scalars(
        select(ChannelPreference).where(ChannelPreference.user_id.in_(list(user_ids)))
    )
    return {row.user_id: _from_row(row) for row in rows}


async def get_preferences(session: AsyncSession, user_id: str) -> PreferencesOut:
    row = await session.get(ChannelPreference, user_id)
    if row is None:
        return PreferencesOut(user_id=user_id)
    return PreferencesOut(user_id=user_id, updated_at=row.updated_at, **_from_row(row).__dict__)


async def save_preferences(
    session: AsyncSession, dialect: str, user_id: str, prefs: Preferences
) -> PreferencesOut:
    now = utcnow()
    data = prefs.model_dump(mode="json")
    await session.execute(
        upsert(
            dialect,
            ChannelPreference,
            [{"user_id": user_id, **data, "updated_at": now}],
            ["user_id"],
            [*data, "updated_at"],
        )
    )
    return PreferencesOut(user_id=user_id, updated_at=now, **prefs.__dict__)


async def disable_channel(
    session: AsyncSession, dialect: str, user_id: str, channel: Channel
) -> PreferencesOut:
    current = await get_preferences(session, user_id)
    prefs = Preferences.model_validate(current.model_dump(exclude={"user_id", "updated_at"}))
    prefs.channels[channel] = False
    return await save_preferences(session, dialect, user_id, prefs)


def _from_row(row: ChannelPreference) -> Preferences:
    return Preferences.model_validate(
        {
            "channels": row.channels,
            "quiet_hours": row.quiet_hours,
            "opted_out_kinds": row.opted_out_kinds,
            "opted_out_elements": row.opted_out_elements,
        }
    )
