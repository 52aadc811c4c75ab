"""The contact policy: a rule layer above the ranker that decides whether an element may be
offered now, and on which channel.

Every "no" carries a rule name (the label of ``nbv_exclusions_total``) and a detail for the
decision log. The history it counts is the decision log's ``contacts`` (one row per offered
item), the open and withdrawn inbox cards and pending deliveries (read-only), and the person's
preferences.
Windows are rolling: "per day" is the last 24 hours, "per week" the last 7 days.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from functools import cached_property
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import (
    JSON,
    String,
    bindparam,
    cast,
    func,
    literal_column,
    null,
    select,
    type_coerce,
    union_all,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from services.decision.library import ValueElement
from shared.contracts import HELD_CARD_STATUSES, WITHDRAWN_CARD_STATUS
from shared.envelope import Channel
from shared.settings import Settings
from shared.store import driver
from shared.store.driver import DriverStatement
from shared.store.models import Contact, Delivery, InboxItem

# Channels that reach a person without them asking (in-app cards wait until they look).
PUSH_CHANNELS = frozenset({Channel.EMAIL, Channel.CSM})
OPEN_DELIVERY_STATUSES = ("pending", "failed")
DAY = timedelta(days=1)
WEEK = timedelta(days=7)


@dataclass(frozen=True)
class Offer:
    element_id: str
    channel: str
    at: datetime


@dataclass(frozen=True)
class QuietWindow:
    start: time
    end: time
    zone: ZoneInfo

    def contains(self, now: datetime) -> bool:
        local = now.astimezone(self.zone).time()
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end  # wraps midnight

    def ends_after(self, now: datetime) -> datetime:
        """The first instant at or after ``now`` outside the window (UTC)."""
        local = now.astimezone(self.zone)
        end = local.replace(hour=self.end.hour, minute=self.end.minute, second=0, microsecond=0)
        if end <= local:
            end += DAY
        return end.astimezone(UTC)


@dataclass
class ContactHistory:
    """What the policy needs to know about one person (loaded once per decision)."""

    offers: list[Offer] = field(default_factory=list)
    open_elements: set[str] = field(default_factory=set)
    # Element id -> when its in-app card was withdrawn unanswered (impression capping).
    withdrawn: dict[str, datetime] = field(default_factory=dict)
    csm_id: str | None = None
    csm_alerts_last_day: int = 0
    quiet: QuietWindow | None = None
    channel_allowed: dict[str, bool] = field(default_factory=dict)
    last_dismissal: datetime | None = None
    # A decision asks about every element and channel: the offers are indexed once, on first
    # use (the history is not changed after it is built).
    _counts: dict[tuple[str, datetime], tuple[int, int]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # The channel rules' verdict per (channel, time), for checks that count no items of the
    # decision being made: the same for every element (ContactPolicy.resolve).
    channel_verdicts: dict[tuple[Channel, datetime], Exclusion | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @cached_property
    def _last_offered(self) -> dict[str, datetime]:
        last: dict[str, datetime] = {}
        for o in self.offers:
            if o.element_id not in last or o.at > last[o.element_id]:
                last[o.element_id] = o.at
        return last

    @cached_property
    def _times_by_channel(self) -> dict[str, list[datetime]]:
        times: dict[str, list[datetime]] = {}
        for o in self.offers:
            times.setdefault(o.channel, []).append(o.at)
        return times

    def last_offered(self, element_id: str) -> datetime | None:
        """When the element was last offered, on any channel."""
        return self._last_offered.get(element_id)

    def offers_on(self, channel: str, now: datetime) -> tuple[int, int]:
        """Offers on the channel in the last 24 h and in the last 7 days before ``now``."""
        key = (channel, now)
        counts = self._counts.get(key)
        if counts is None:
            times = self._times_by_channel.get(channel, ())
            counts = self._counts[key] = (
                sum(1 for at in times if at > now - DAY),
                sum(1 for at in times if at > now - WEEK),
            )
        return counts


@dataclass(frozen=True)
class Exclusion:
    rule: str
    detail: str


@dataclass(frozen=True)
class ContactLimits:
    cap_per_day: dict[str, int]
    cap_per_week: dict[str, int]
    dismissal_suppression: timedelta
    quiet_start: time
    quiet_end: time
    csm_alerts_per_day: int
    withdrawn_cooldown: timedelta = timedelta(0)

    @classmethod
    def from_settings(cls, s: Settings) -> ContactLimits:
        return cls(
            cap_per_day=dict(s.contact_cap_per_day),
            cap_per_week=dict(s.contact_cap_per_week),
            dismissal_suppression=timedelta(hours=s.dismissal_suppression_hours),
            quiet_start=time.fromisoformat(s.quiet_hours_start),
            quiet_end=time.fromisoformat(s.quiet_hours_end),
            csm_alerts_per_day=s.csm_alerts_per_day,
            withdrawn_cooldown=timedelta(days=s.inapp_withdrawn_cooldown_days),
        )


def _zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name) if name else ZoneInfo("UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def quiet_window(
    limits: ContactLimits, user_timezone: str | None, preference: dict[str, object] | None
) -> QuietWindow:
    """The person's own quiet hours from the preference centre, else the default window, in
    their timezone (UTC when unknown)."""
    if preference and preference.get("start") and preference.get("end"):
        zone = _zone(str(preference.get("timezone") or user_timezone or ""))
        return QuietWindow(
            time.fromisoformat(str(preference["start"])),
            time.fromisoformat(str(preference["end"])),
            zone,
        )
    return QuietWindow(limits.quiet_start, limits.quiet_end, _zone(user_timezone))


class ContactPolicy:
    def __init__(self, limits: ContactLimits) -> None:
        self.limits = limits

    def element_exclusion(
        self, element: ValueElement, history: ContactHistory, now: datetime
    ) -> Exclusion | None:
        """Rules about the element whatever the channel: pending offer, a card withdrawn
        unanswered not long ago, cool-down."""
        if element.id in history.open_elements:
            return Exclusion("pending", "an offer of this element is still open")
        withdrawn = history.withdrawn.get(element.id)
        if withdrawn is not None and now < withdrawn + self.limits.withdrawn_cooldown:
            # Shown again and again without an answer: offering it again soon would put the
            # same unwanted card back in the widget.
            return Exclusion(
                "withdrawn",
                f"in-app card withdrawn unanswered {withdrawn.isoformat()}; "
                f"cool-down {self.limits.withdrawn_cooldown.total_seconds() / 86400:g} d",
            )
        if element.cooldown_days:
            last = history.last_offered(element.id)
            if last is not None and last > now - timedelta(days=element.cooldown_days):
                return Exclusion(
                    "cooldown", f"offered {last.isoformat()}; cool-down {element.cooldown_days} d"
                )
        return None

    def channel_exclusion(
        self,
        channel: Channel,
        history: ContactHistory,
        now: datetime,
        used: Counter[str] | None = None,
    ) -> Exclusion | None:
        """Rules about contacting this person on this channel now. ``used`` counts the items
        already given this channel within the decision being made."""
        name = channel.value
        if history.channel_allowed.get(name) is False:
            return Exclusion("opted_out", f"{name} turned off in the preference centre")
        extra = used[name] if used else 0
        day_cap = self.limits.cap_per_day.get(name)
        week_cap = self.limits.cap_per_week.get(name)
        if day_cap is not None or week_cap is not None:
            last_day, last_week = history.offers_on(name, now)
            if day_cap is not None:
                n = last_day + extra
                if n >= day_cap:
                    return Exclusion("cap_day", f"{n} {name} contact(s) in 24 h (cap {day_cap})")
            if week_cap is not None:
                n = last_week + extra
                if n >= week_cap:
                    return Exclusion("cap_week", f"{n} {name} contact(s) in 7 d (cap {week_cap})")
        if channel is Channel.EMAIL and history.last_dismissal is not None:
            until = history.last_dismissal + self.limits.dismissal_suppression
            if now < until:
                return Exclusion(
                    "dismissal_suppression",
                    f"dismissed something at {history.last_dismissal.isoformat()}; "
                    f"no email before {until.isoformat()}",
                )
        if channel in PUSH_CHANNELS and history.quiet is not None and history.quiet.contains(now):
            q = history.quiet
            return Exclusion("quiet_hours", f"{q.start:%H:%M}-{q.end:%H:%M} in {q.zone.key}")
        if channel is Channel.CSM:
            n = history.csm_alerts_last_day + extra
            if n >= self.limits.csm_alerts_per_day:
                return Exclusion(
                    "csm_cap",
                    f"CSM {history.csm_id} has {n} alert(s) in 24 h "
                    f"(cap {self.limits.csm_alerts_per_day})",
                )
        return None

    def resolve(
        self,
        element: ValueElement,
        requested: Channel | None,
        history: ContactHistory,
        now: datetime,
        used: Counter[str] | None = None,
    ) -> tuple[Channel | None, Exclusion | None]:
        """The channel to offer the element on, or why it cannot be offered now."""
        excluded = self.element_exclusion(element, history, now)
        if excluded:
            return None, excluded
        options: Sequence[Channel] = [requested] if requested else element.channels
        first: Exclusion | None = None
        for channel in options:
            if used:
                blocked = self.channel_exclusion(channel, history, now, used)
            else:
                key = (channel, now)
                if key in history.channel_verdicts:
                    blocked = history.channel_verdicts[key]
                else:
                    blocked = history.channel_verdicts[key] = self.channel_exclusion(
                        channel, history, now
                    )
            if blocked is None:
                return channel, None
            first = first or blocked
        return None, first


def history_horizon(elements: Iterable[ValueElement]) -> timedelta:
    """How far back the policy looks: the longest cool-down, at least a week, at most a year."""
    longest = max((e.cooldown_days for e in elements), default=7)
    return timedelta(days=min(365, max(7, longest)))


def history_entries(dialect: str, user: Any) -> Any:
    """The person's contact history as one JSON column, for the statement that reads people
    (services/decision/person.py), so the policy costs no round trip of its own:
    ``[[kind, element_id, channel, at], …]`` with kind "c" for a recent offer, "o" for an
    open card or delivery (channel and time null) and "w" for a withdrawn card (at: when). A
    person has at most one card per element, so the withdrawn ones are read whatever their age
    (the cool-down after a withdrawal is a setting, not tied to ``since``). ``user`` is the
    outer statement's user id column (the subquery is correlated to it); binds ``since``."""
    no_channel = cast(null(), String)
    no_time = cast(null(), Contact.at.type)
    entries = union_all(
        select(
            literal_column("'c'").label("kind"),
            Contact.element_id.label("element_id"),
            Contact.channel.label("channel"),
            Contact.at.label("at"),
        )
        .where(Contact.user_id == user, Contact.at > bindparam("since", type_=Contact.at.type))
        .correlate(user.table),
        select(literal_column("'o'"), InboxItem.element_id, no_channel, no_time)
        .where(InboxItem.user_id == user, InboxItem.status.in_(_constants(HELD_CARD_STATUSES)))
        .correlate(user.table),
        select(literal_column("'o'"), Delivery.element_id, no_channel, no_time)
        .where(Delivery.user_id == user, Delivery.status.in_(_constants(OPEN_DELIVERY_STATUSES)))
        .correlate(user.table),
        select(literal_column("'w'"), InboxItem.element_id, no_channel, InboxItem.updated_at)
        .where(
            InboxItem.user_id == user,
            InboxItem.status == _constants((WITHDRAWN_CARD_STATUS,))[0],
        )
        .correlate(user.table),
    ).subquery("history")
    row = (entries.c.kind, entries.c.element_id, entries.c.channel, entries.c.at)
    if dialect == "postgresql":
        aggregate = func.json_agg(func.json_build_array(*row))
    else:
        aggregate = func.json_group_array(func.json_array(*row))
    # type_coerce, not CAST: SQLite would turn CAST(… AS JSON) into a number.
    return type_coerce(select(aggregate).scalar_subquery(), JSON)


def _constants(values: Sequence[str]) -> list[Any]:
    # Rendered into the SQL once, not expanded into bound parameters on every execution.
    return [literal_column("'" + v.replace("'", "''") + "'") for v in values]


@dataclass(frozen=True)
class History:
    """What ``history_entries``' column holds, parsed."""

    offers: list[Offer]
    open_elements: set[str]
    withdrawn: dict[str, datetime]


def parse_history(entries: Sequence[Sequence[Any]] | None) -> History:
    """The offers, the open elements and the withdrawn cards from ``history_entries``'
    column."""
    history = History([], set(), {})
    for kind, element_id, channel, at in entries or ():
        if kind == "c":
            history.offers.append(Offer(element_id, channel, _utc(at)))
        elif kind == "w":
            history.withdrawn[element_id] = _utc(at)
        else:
            history.open_elements.add(element_id)
    return history


def _utc(value: str) -> datetime:
    # PostgreSQL writes the offset of the session's time zone; SQLite keeps the naive UTC text.
    parsed = datetime.fromisoformat(value)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


_CSM_ALERTS = (
    select(func.count())
    .select_from(Contact)
    .where(
        Contact.csm_id == bindparam("csm_id"),
        Contact.channel == bindparam("channel"),
        Contact.at > bindparam("since"),
    )
)


@functools.cache
def _csm_alerts_on_driver(dialect: Dialect) -> DriverStatement:
    return DriverStatement(_CSM_ALERTS, dialect)


async def csm_alerts_last_day(connection: AsyncConnection, csm_id: str, now: datetime) -> int:
    """CSM alerts offered in the last 24 h over all the CSM's accounts (only when a decision
    may alert a CSM, so it is not part of the person's statement). On PostgreSQL it runs on
    the driver, as the person's read does: the decision's transaction is the driver's own
    (services.decision.group_commit)."""
    params = {"csm_id": csm_id, "channel": Channel.CSM.value, "since": now - DAY}
    if connection.dialect.name != "postgresql":
        return int(await connection.scalar(_CSM_ALERTS, params) or 0)
    rows = await driver.fetch(connection, _csm_alerts_on_driver(connection.dialect), params)
    return int(rows[0][0])


def contact_history(
    limits: ContactLimits,
    *,
    read: History,
    user_timezone: str | None,
    channels: dict[str, Any] | None,
    quiet_hours: dict[str, Any] | None,
    dismissed: dict[str, str],
    csm_id: str | None,
    csm_load: int,
) -> ContactHistory:
    """What the policy knows about one person: the history read with the person (``read``), their
    preference centre (``channels``, ``quiet_hours``; None without one) and dismissals."""
    dismissals = [_parse_time(v) for v in dismissed.values()]
    return ContactHistory(
        offers=read.offers,
        open_elements=read.open_elements,
        withdrawn=read.withdrawn,
        csm_id=csm_id,
        csm_alerts_last_day=csm_load,
        quiet=quiet_window(limits, user_timezone, quiet_hours),
        channel_allowed={str(k): bool(v) for k, v in (channels or {}).items()},
        last_dismissal=max((d for d in dismissals if d is not None), default=None),
    )


def _parse_time(value: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
