"""The one envelope every event travels in, and the typed payload of each event type.

The envelope ``id`` is the idempotency key: a producer that retries sends the same id, and
every consumer ignores an id it has already applied.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, field_validator

Identifier = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@\-]+$")]


class Role(StrEnum):
    END_USER = "end_user"
    ADMIN = "admin"
    CHAMPION = "champion"
    ECONOMIC_BUYER = "economic_buyer"


class Channel(StrEnum):
    IN_APP = "in_app"
    EMAIL = "email"
    CSM = "csm"


class Outcome(StrEnum):
    SHOWN = "shown"
    CLICKED = "clicked"
    COMPLETED = "completed"
    DISMISSED = "dismissed"


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrackPayload(_Payload):
    """A product usage event (Segment ``track``)."""

    event: Annotated[str, Field(min_length=1, max_length=200)]
    feature_area: str | None = None
    properties: dict[str, Any] = Field(default_factory=dict)


class IdentifyPayload(_Payload):
    """Who a user is. Personal fields (email, name) stay in the view, never in logs."""

    email: str | None = None
    name: str | None = None
    role: Role | None = None
    timezone: str | None = None


class SubscriptionPayload(_Payload):
    plan: Annotated[str, Field(min_length=1, max_length=100)]
    status: Literal["active", "trialing", "past_due", "canceled"] = "active"
    mrr: Annotated[float, Field(ge=0)] = 0.0
    renewal_date: datetime | None = None


class TicketPayload(_Payload):
    ticket_id: Identifier
    priority: Literal["low", "normal", "high", "urgent"] = "normal"
    subject: str | None = None


class NpsPayload(_Payload):
    score: Annotated[int, Field(ge=0, le=10)]
    comment: str | None = None


class ResponsePayload(_Payload):
    """A person's response to a delivered Value Element; also the ranker's label."""

    decision_id: Identifier
    element_id: Identifier
    outcome: Outcome
    channel: Channel = Channel.IN_APP


class TriggerPayload(_Payload):
    """Emitted by the projector when a view crosses a line the playbooks care about."""

    trigger: Annotated[str, Field(min_length=1, max_length=100)]
    reason: str
    cause_event_id: Identifier


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Identifier = Field(default_factory=lambda: str(uuid.uuid4()))
    source: Annotated[str, Field(min_length=1, max_length=100)]
    time: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    account_id: Identifier
    user_id: Identifier | None = None

    @field_validator("time")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)


class _UserEnvelope(_Envelope):
    user_id: Identifier


class TrackEvent(_UserEnvelope):
    type: Literal["product.track"]
    payload: TrackPayload


class IdentifyEvent(_UserEnvelope):
    type: Literal["user.identify"]
    payload: IdentifyPayload


class SubscriptionEvent(_Envelope):
    type: Literal["billing.subscription_updated"]
    payload: SubscriptionPayload


class TicketOpenedEvent(_Envelope):
    type: Literal["support.ticket_opened"]
    payload: TicketPayload


class TicketSolvedEvent(_Envelope):
    type: Literal["support.ticket_solved"]
    payload: TicketPayload


class NpsEvent(_UserEnvelope):
    type: Literal["survey.nps"]
    payload: NpsPayload


class ResponseEvent(_UserEnvelope):
    type: Literal["nbv.response"]
    payload: ResponsePayload


class TriggerEvent(_Envelope):
    type: Literal["nbv.trigger"]
    payload: TriggerPayload


Event = Annotated[
    TrackEvent
    | IdentifyEvent
    | SubscriptionEvent
    | TicketOpenedEvent
    | TicketSolvedEvent
    | NpsEvent
    | ResponseEvent
    | TriggerEvent,
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)

# What outside sources may send to ingest; responses and triggers come from NBV itself.
InboundEvent = Annotated[
    TrackEvent
    | IdentifyEvent
    | SubscriptionEvent
    | TicketOpenedEvent
    | TicketSolvedEvent
    | NpsEvent,
    Field(discriminator="type"),
]
EVENT_TYPES: tuple[str, ...] = (
    "product.track",
    "user.identify",
    "billing.subscription_updated",
    "support.ticket_opened",
    "support.ticket_solved",
    "survey.nps",
    "nbv.response",
    "nbv.trigger",
)


def encode(event: BaseModel) -> bytes:
    return event.model_dump_json().encode()


def decode(raw: bytes) -> Event:
    return EVENT_ADAPTER.validate_json(raw)
