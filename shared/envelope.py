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
    # "Not now": the card comes back later; unlike a dismissal it suppresses nothing.
    SNOOZED = "snoozed"


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrackPayload(_Payload):
    """A product usage event (Segment ``track``)."""

    event: Annotated[str, Field(min_length=1, max_length=200)]
    feature_area: str | None = None
    properties: dict[str, Any] = Field(default_factory=dict)


class IdentifyPayload(_Payload):
    """Who a user is. Personal fields (email, name) stay in the view, never in logs."""

    # Bounded like the view's columns, so an over-long value is refused at the door.
    email: Annotated[str | None, Field(max_length=320)] = None
    name: Annotated[str | None, Field(max_length=200)] = None
    role: Role | None = None
    timezone: Annotated[str | None, Field(max_length=64)] = None


SubscriptionStatus = Literal[
    "active",
    "trialing",
    "past_due",
    "canceled",
    # Stripe's other states; a subscription in them is not (yet, or any more) paying.
    "incomplete",
    "incomplete_expired",
    "unpaid",
    "paused",
]


class SubscriptionPayload(_Payload):
    plan: Annotated[str, Field(min_length=1, max_length=100)]
    status: SubscriptionStatus = "active"
    mrr: Annotated[float, Field(ge=0)] = 0.0
    renewal_date: datetime | None = None
    subscription_id: str | None = None
    customer_id: str | None = None


class InvoicePayload(_Payload):
    """An invoice paid or a payment attempt that failed."""

    invoice_id: Annotated[str, Field(min_length=1, max_length=200)]
    amount: Annotated[float, Field(ge=0)] = 0.0
    currency: str | None = None
    attempt_count: Annotated[int, Field(ge=0)] = 0
    subscription_id: str | None = None


TicketPriority = Literal["low", "normal", "high", "urgent"]


class TicketPayload(_Payload):
    ticket_id: Identifier
    priority: TicketPriority = "normal"
    subject: str | None = None
    # The product area the question is about, when the support tool tags it: it lowers the
    # asker's sophistication in that area.
    feature_area: str | None = None


class NpsPayload(_Payload):
    score: Annotated[int, Field(ge=0, le=10)]
    comment: str | None = None


class CsatPayload(_Payload):
    """A customer satisfaction answer on a 1–5 scale (5 = very satisfied)."""

    score: Annotated[int, Field(ge=1, le=5)]
    ticket_id: Identifier | None = None
    comment: str | None = None


class PagePayload(_Payload):
    """A page or screen view (Segment ``page``)."""

    name: Annotated[str, Field(min_length=1, max_length=200)]
    category: str | None = None
    feature_area: str | None = None
    properties: dict[str, Any] = Field(default_factory=dict)


class GroupPayload(_Payload):
    """A user belongs to an account (Segment ``group``); traits describe the account."""

    name: Annotated[str | None, Field(max_length=200)] = None
    plan: Annotated[str | None, Field(max_length=100)] = None
    traits: dict[str, Any] = Field(default_factory=dict)


class ContactRolePayload(_Payload):
    """A CRM change to a contact's role on the account, e.g. a champion who left."""

    role: Role
    change: Literal["assigned", "removed", "left"] = "assigned"
    email: str | None = None
    name: str | None = None


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


class PageEvent(_UserEnvelope):
    type: Literal["product.page"]
    payload: PagePayload


class GroupEvent(_Envelope):
    type: Literal["account.group"]
    payload: GroupPayload


class InvoicePaidEvent(_Envelope):
    type: Literal["billing.invoice_paid"]
    payload: InvoicePayload


class PaymentFailedEvent(_Envelope):
    type: Literal["billing.payment_failed"]
    payload: InvoicePayload


class TicketUpdatedEvent(_Envelope):
    type: Literal["support.ticket_updated"]
    payload: TicketPayload


class CsatEvent(_Envelope):
    type: Literal["survey.csat"]
    payload: CsatPayload


class ContactRoleEvent(_UserEnvelope):
    type: Literal["crm.contact_role"]
    payload: ContactRolePayload


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
    | TriggerEvent
    | PageEvent
    | GroupEvent
    | InvoicePaidEvent
    | PaymentFailedEvent
    | TicketUpdatedEvent
    | CsatEvent
    | ContactRoleEvent,
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
    | NpsEvent
    | PageEvent
    | GroupEvent
    | InvoicePaidEvent
    | PaymentFailedEvent
    | TicketUpdatedEvent
    | CsatEvent
    | ContactRoleEvent,
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
    "product.page",
    "account.group",
    "billing.invoice_paid",
    "billing.payment_failed",
    "support.ticket_updated",
    "survey.csat",
    "crm.contact_role",
)


def encode(event: BaseModel) -> bytes:
    # The same bytes as model_dump_json().encode(), straight from the serializer: no str to
    # encode again, none of model_dump_json's argument handling (half its cost per event,
    # and the intake encodes every event it accepts).
    return event.__pydantic_serializer__.to_json(event)


def decode(raw: bytes) -> Event:
    return EVENT_ADAPTER.validate_json(raw)
