"""CRM contact role changes (champion, economic buyer, admin; a contact leaving) →
``crm.contact_role`` events."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict

from services.ingest.adapters import content_id
from shared.envelope import ContactRoleEvent, ContactRolePayload, Identifier, Role

SOURCE = "crm"


class ContactChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Without one, a hash of the body: a retry of the same body is deduplicated.
    id: Identifier | None = None
    time: AwareDatetime | None = None
    account_id: Identifier
    user_id: Identifier
    role: Literal["champion", "economic_buyer", "admin"]
    change: Literal["assigned", "removed", "left"] = "assigned"
    email: str | None = None
    name: str | None = None


def to_event(change: ContactChange) -> ContactRoleEvent:
    return ContactRoleEvent(
        id=change.id or content_id(SOURCE, change),
        source=SOURCE,
        type="crm.contact_role",
        time=change.time or datetime.now(UTC),
        account_id=change.account_id,
        user_id=change.user_id,
        payload=ContactRolePayload(
            role=Role(change.role), change=change.change, email=change.email, name=change.name
        ),
    )
