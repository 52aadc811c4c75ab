"""CRM contact role changes (champion, economic buyer, admin; a contact leaving) →
``crm.contact_role`` events."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from shared.envelope import ContactRoleEvent, ContactRolePayload, Identifier, Role

SOURCE = "crm"


class ContactChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Identifier = Field(default_factory=lambda: str(uuid.uuid4()))
    time: AwareDatetime | None = None
    account_id: Identifier
    user_id: Identifier
    role: Literal["champion", "economic_buyer", "admin"]
    change: Literal["assigned", "removed", "left"] = "assigned"
    email: str | None = None
    name: str | None = None


def to_event(change: ContactChange) -> ContactRoleEvent:
    return ContactRoleEvent(
        id=change.id,
        source=SOURCE,
        type="crm.contact_role",
        time=change.time or datetime.now(UTC),
        account_id=change.account_id,
        user_id=change.user_id,
        payload=ContactRolePayload(
            role=Role(change.role), change=change.change, email=change.email, name=change.name
        ),
    )
