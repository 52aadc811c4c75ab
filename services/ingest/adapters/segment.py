"""Segment-spec compatible API: ``track``, ``identify``, ``group``, ``page`` (and ``screen``),
single or in a ``batch``, as sent by Segment and RudderStack libraries.

Mapping (docs/ingest.md):

- user: ``userId``, else ``anon:<anonymousId>``;
- account: ``groupId`` of a ``group`` call, else ``context.groupId``, else the account of the
  user's last ``group`` call (the ``user_accounts`` table); none of them → 422 on
  ``context.groupId``;
- id: ``messageId`` (the idempotency key); a message without one gets a hash of its content,
  so a retried identical body is still deduplicated;
- time: ``timestamp`` corrected for the client's clock skew with ``sentAt``
  (``receivedAt - (sentAt - timestamp)``, as Segment does), else ``timestamp``/
  ``originalTimestamp`` as given, else the time received; never later than received;
- ``properties.feature_area`` (or ``featureArea``) becomes the event's feature area.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.ingest.adapters import Unmappable
from shared.envelope import (
    GroupEvent,
    GroupPayload,
    IdentifyEvent,
    IdentifyPayload,
    InboundEvent,
    PageEvent,
    PagePayload,
    Role,
    TrackEvent,
    TrackPayload,
)

SOURCE = "segment"
MAX_BATCH = 1_000
_ID = re.compile(r"^[A-Za-z0-9._:@\-]{1,200}$")
_ROLES = {r.value for r in Role}


class _Message(BaseModel):
    # Segment messages carry much more (integrations, context.library, …): kept out, not refused.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    user_id: Annotated[str | None, Field(alias="userId", max_length=190)] = None
    anonymous_id: Annotated[str | None, Field(alias="anonymousId", max_length=190)] = None
    message_id: Annotated[str | None, Field(alias="messageId", max_length=500)] = None
    timestamp: datetime | None = None
    original_timestamp: datetime | None = Field(default=None, alias="originalTimestamp")
    sent_at: datetime | None = Field(default=None, alias="sentAt")
    context: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _someone(self) -> _Message:
        if not self.user_id and not self.anonymous_id and not isinstance(self, GroupMessage):
            raise ValueError("userId or anonymousId is required")
        return self


class TrackMessage(_Message):
    type: Literal["track"] = "track"
    event: Annotated[str, Field(min_length=1, max_length=200)]
    properties: dict[str, Any] = Field(default_factory=dict)


class IdentifyMessage(_Message):
    type: Literal["identify"] = "identify"
    traits: dict[str, Any] = Field(default_factory=dict)


class GroupMessage(_Message):
    type: Literal["group"] = "group"
    group_id: Annotated[str, Field(alias="groupId", min_length=1, max_length=200)]
    traits: dict[str, Any] = Field(default_factory=dict)


class PageMessage(_Message):
    type: Literal["page", "screen"] = "page"
    name: str | None = None
    category: str | None = None
    properties: dict[str, Any] = Field(default_factory=dict)


SegmentMessage = Annotated[
    TrackMessage | IdentifyMessage | GroupMessage | PageMessage, Field(discriminator="type")
]


class SegmentBatch(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    batch: Annotated[list[SegmentMessage], Field(min_length=1, max_length=MAX_BATCH)]
    # Batch-level fields apply to every message that lacks its own.
    sent_at: datetime | None = Field(default=None, alias="sentAt")
    context: dict[str, Any] = Field(default_factory=dict)


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def event_time(message: _Message, received_at: datetime, sent_at: datetime | None) -> datetime:
    stamp = _aware(message.timestamp or message.original_timestamp)
    sent = _aware(message.sent_at or sent_at)
    if stamp is None:
        return received_at
    if sent is not None:
        # An absurd sentAt (year 4026…) says nothing about the skew: keep the timestamp.
        with contextlib.suppress(OverflowError):
            stamp = received_at - (sent - stamp)
    return min(stamp, received_at)


def _identifier(raw: str, field: str) -> str:
    if _ID.match(raw):
        return raw
    # Ids outside the envelope's alphabet (spaces, slashes…) are hashed, stably.
    digest = hashlib.sha256(raw.encode()).hexdigest()[:40]
    if not raw.strip():
        raise Unmappable(field, "must not be blank")
    return f"h:{digest}"


def user_of(message: _Message) -> str | None:
    if message.user_id:
        return _identifier(message.user_id, "userId")
    if message.anonymous_id:
        return "anon:" + _identifier(message.anonymous_id, "anonymousId")
    return None


def message_id(message: _Message) -> str:
    if message.message_id:
        return _identifier(message.message_id, "messageId")
    body = json.dumps(message.model_dump(mode="json", by_alias=True), sort_keys=True)
    return "seg:" + hashlib.sha256(body.encode()).hexdigest()[:40]


def account_of(message: _Message, context: Mapping[str, Any], known: Mapping[str, str]) -> str:
    if isinstance(message, GroupMessage):
        return _identifier(message.group_id, "groupId")
    group = message.context.get("groupId") or context.get("groupId")
    if isinstance(group, str | int) and str(group):
        return _identifier(str(group), "context.groupId")
    user = user_of(message)
    if user is not None and user in known:
        return known[user]
    raise Unmappable(
        "context.groupId",
        "no account for this user: send context.groupId or a group call first",
    )


def _feature_area(properties: Mapping[str, Any]) -> str | None:
    area = properties.get("feature_area", properties.get("featureArea"))
    return str(area)[:100] if area else None


def _identify_payload(traits: Mapping[str, Any], context: Mapping[str, Any]) -> IdentifyPayload:
    name = traits.get("name")
    if not name and (traits.get("firstName") or traits.get("lastName")):
        name = " ".join(str(traits.get(k) or "") for k in ("firstName", "lastName")).strip()
    role = traits.get("role")
    timezone = traits.get("timezone") or context.get("timezone")
    return IdentifyPayload(
        email=str(traits["email"]) if traits.get("email") else None,
        name=str(name) if name else None,
        # A role outside NBV's (e.g. a job title) is not NBV's role: left unset.
        role=Role(role) if isinstance(role, str) and role in _ROLES else None,
        timezone=str(timezone) if timezone else None,
    )


def to_event(
    message: _Message,
    *,
    received_at: datetime,
    known: Mapping[str, str],
    sent_at: datetime | None = None,
    context: Mapping[str, Any] | None = None,
) -> InboundEvent:
    """One Segment message → one envelope event (``known``: user id → account id)."""
    ctx = {**(context or {}), **message.context}
    common: dict[str, Any] = {
        "id": message_id(message),
        "source": SOURCE,
        "time": event_time(message, received_at, sent_at),
        "account_id": account_of(message, ctx, known),
        "user_id": user_of(message),
    }
    try:
        return _mapped(message, ctx, common)
    except ValidationError as exc:
        # A value the envelope bounds (a 300-character name…): the sender's field, named.
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        prefix = "traits." if isinstance(message, IdentifyMessage | GroupMessage) else ""
        raise Unmappable(prefix + where, first["msg"]) from exc


def _mapped(message: _Message, ctx: Mapping[str, Any], common: dict[str, Any]) -> InboundEvent:
    match message:
        case TrackMessage():
            return TrackEvent(
                type="product.track",
                payload=TrackPayload(
                    event=message.event,
                    feature_area=_feature_area(message.properties),
                    properties=message.properties,
                ),
                **common,
            )
        case IdentifyMessage():
            shared = ctx.get("traits")
            traits = {**(shared if isinstance(shared, dict) else {}), **message.traits}
            return IdentifyEvent(
                type="user.identify", payload=_identify_payload(traits, ctx), **common
            )
        case GroupMessage():
            plan = message.traits.get("plan")
            return GroupEvent(
                type="account.group",
                payload=GroupPayload(
                    name=str(message.traits["name"]) if message.traits.get("name") else None,
                    plan=str(plan) if plan else None,
                    traits=message.traits,
                ),
                **common,
            )
        case PageMessage():
            name = message.name or message.properties.get("title") or message.properties.get("path")
            return PageEvent(
                type="product.page",
                payload=PagePayload(
                    name=str(name or "unnamed")[:200],
                    category=message.category,
                    feature_area=_feature_area(message.properties),
                    properties=message.properties,
                ),
                **common,
            )
    raise Unmappable("type", f"unsupported message {type(message).__name__}")


def to_events(
    messages: Sequence[_Message],
    *,
    received_at: datetime,
    known: Mapping[str, str],
    sent_at: datetime | None = None,
    context: Mapping[str, Any] | None = None,
) -> list[InboundEvent]:
    """A request's messages → events, all or none; ``Unmappable`` names the message's field."""
    context = context or {}
    accounts = dict(known)

    def located(exc: Unmappable, index: int) -> Unmappable:
        return Unmappable(
            f"batch[{index}].{exc.field}" if len(messages) > 1 else exc.field, exc.message
        )

    # Libraries often send identify before group in the same batch: the batch's own group
    # calls say where its users belong.
    for index, m in enumerate(messages):
        try:
            if isinstance(m, GroupMessage) and (user := user_of(m)):
                accounts[user] = account_of(m, context, accounts)
        except Unmappable as exc:
            raise located(exc, index) from exc
    events: list[InboundEvent] = []
    for index, message in enumerate(messages):
        try:
            event = to_event(
                message, received_at=received_at, known=accounts, sent_at=sent_at, context=context
            )
        except Unmappable as exc:
            raise located(exc, index) from exc
        if event.user_id is not None:
            # A group call, or any message naming an account, tells later ones without it.
            accounts[event.user_id] = event.account_id
        events.append(event)
    return events


def users_needing_lookup(messages: list[_Message], context: Mapping[str, Any]) -> set[str]:
    """Users whose account must come from a prior ``group`` call."""
    needed: set[str] = set()
    for m in messages:
        if isinstance(m, GroupMessage) or m.context.get("groupId") or context.get("groupId"):
            continue
        # An id that cannot be mapped is refused by to_events, with its place in the batch.
        with contextlib.suppress(Unmappable):
            user = user_of(m)
            if user is not None:
                needed.add(user)
    return needed
