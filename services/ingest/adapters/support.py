"""Support-desk webhooks (Zendesk-like JSON) → ticket and CSAT events.

Shape (docs/ingest.md): ``{"id", "type", "time", "detail": {ticket}}`` where ``type`` is
``ticket.created``, ``ticket.updated``, ``ticket.priority_changed``, ``ticket.status_changed``,
``ticket.solved`` or ``ticket.satisfaction_rating_changed``, optionally prefixed with Zendesk's
``zen:event-type:``. The account is ``detail.organization.external_id`` and the user
``detail.requester.external_id`` (the ids the product knows them by); a ``area:<name>`` tag
names the product area the ticket is about.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.ingest.adapters import Unmappable
from shared.envelope import (
    CsatEvent,
    CsatPayload,
    Identifier,
    InboundEvent,
    TicketOpenedEvent,
    TicketPayload,
    TicketSolvedEvent,
    TicketUpdatedEvent,
)

SOURCE = "support"
_PREFIX = "zen:event-type:"
SOLVED = ("solved", "closed")
# Zendesk's good/bad rating on the 1–5 CSAT scale.
_RATING = {"good": 5, "bad": 1}


class _Party(BaseModel):
    model_config = ConfigDict(extra="ignore")
    external_id: Identifier | None = None


class SatisfactionRating(BaseModel):
    model_config = ConfigDict(extra="ignore")
    score: int | str
    comment: str | None = None


class Ticket(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: Identifier
    priority: Literal["low", "normal", "high", "urgent"] | None = None
    status: str | None = None
    subject: str | None = None
    tags: list[str] = Field(default_factory=list)
    organization: _Party = _Party()
    requester: _Party = _Party()
    satisfaction_rating: SatisfactionRating | None = None

    @field_validator("priority", "status", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        # Zendesk sends HIGH / SOLVED in event webhooks and high / solved in the REST API.
        return value.lower() if isinstance(value, str) else value

    @field_validator("id", mode="before")
    @classmethod
    def _text_id(cls, value: object) -> object:
        return str(value) if isinstance(value, int) else value


class SupportWebhook(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: Identifier
    type: Annotated[str, Field(min_length=1, max_length=200)]
    time: datetime | None = None
    detail: Ticket


def _area(tags: list[str]) -> str | None:
    for tag in tags:
        if tag.startswith("area:") and len(tag) > 5:
            return tag[5:][:100]
    return None


def csat_score(raw: int | str) -> int:
    if isinstance(raw, str):
        if raw.lower() in _RATING:
            return _RATING[raw.lower()]
        try:
            raw = int(raw)
        except ValueError:
            raise Unmappable(
                "detail.satisfaction_rating.score", "must be good, bad or 1–5"
            ) from None
    if not 1 <= raw <= 5:
        raise Unmappable("detail.satisfaction_rating.score", "must be good, bad or 1–5")
    return raw


def to_event(hook: SupportWebhook, received_at: datetime) -> InboundEvent:
    ticket = hook.detail
    if ticket.organization.external_id is None:
        raise Unmappable("detail.organization.external_id", "ticket has no NBV account id")
    kind = hook.type.removeprefix(_PREFIX)
    at = hook.time or received_at
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at
    common: dict[str, Any] = {
        "id": hook.id,
        "source": SOURCE,
        "time": at,
        "account_id": ticket.organization.external_id,
        "user_id": ticket.requester.external_id,
    }
    if kind in ("ticket.satisfaction_rating_changed", "ticket.csat"):
        rating = ticket.satisfaction_rating
        if rating is None:
            raise Unmappable("detail.satisfaction_rating", "required for a rating event")
        return CsatEvent(
            type="survey.csat",
            payload=CsatPayload(
                score=csat_score(rating.score), ticket_id=ticket.id, comment=rating.comment
            ),
            **common,
        )
    payload = TicketPayload(
        ticket_id=ticket.id,
        priority=ticket.priority or "normal",
        subject=ticket.subject,
        feature_area=_area(ticket.tags),
    )
    if kind == "ticket.created":
        return TicketOpenedEvent(type="support.ticket_opened", payload=payload, **common)
    if kind == "ticket.solved" or (
        kind in ("ticket.status_changed", "ticket.updated") and ticket.status in SOLVED
    ):
        return TicketSolvedEvent(type="support.ticket_solved", payload=payload, **common)
    if kind in ("ticket.updated", "ticket.priority_changed", "ticket.status_changed"):
        return TicketUpdatedEvent(type="support.ticket_updated", payload=payload, **common)
    raise Unmappable("type", f"unsupported support event type {hook.type!r}")
