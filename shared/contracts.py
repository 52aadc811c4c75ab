"""Messages between services other than events: decisions (decision → delivery)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.envelope import Channel, Role


class Resource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["link", "guide", "video", "checklist", "button", "calendar"]
    label: str = Field(min_length=1)
    url: str = Field(min_length=1)


class ElementContent(BaseModel):
    """What a person sees: What to do, Why it helps them, How (the resources)."""

    model_config = ConfigDict(frozen=True)

    element_id: str
    title: str
    kind: str
    what: str
    why: str
    how: list[Resource]


class DecidedItem(BaseModel):
    model_config = ConfigDict(frozen=True)

    element_id: str
    rank: int
    channel: Channel
    score: float
    propensity: float = Field(gt=0, le=1)
    reason: str
    content: ElementContent


class DecisionMessage(BaseModel):
    """Published on the decisions topic; delivery turns each item into a delivery."""

    model_config = ConfigDict(frozen=True)

    decision_id: str
    user_id: str
    account_id: str
    role: Role | None = None
    created_at: datetime
    trigger: str | None = None
    model_version: str
    items: list[DecidedItem]


# Inbox card statuses shared by delivery (which moves them) and decision (which must not
# offer an element again while its card is still open or only snoozed).
OPEN_CARD_STATUSES = ("pending", "shown", "clicked")
HELD_CARD_STATUSES = (*OPEN_CARD_STATUSES, "snoozed")
# An in-app card withdrawn after too many impressions without an answer (impression capping):
# closed, and held back by the decision service for a cool-down rather than for good.
WITHDRAWN_CARD_STATUS = "expired"
