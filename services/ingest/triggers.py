"""Triggers: the lines a view crosses that the playbooks react to.

A trigger is published on the triggers topic with a deterministic id (the cause's id and the
trigger name, or a scheduled job's key), so a redelivered batch or a re-run job publishes the
same id again and the decision service ignores the copy.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel

from shared.bus import Message
from shared.envelope import Event, TriggerEvent, TriggerPayload, encode


class TriggerName(StrEnum):
    NPS_DETRACTOR = "nps_detractor"
    CONTRACT_SIGNED = "contract_signed"
    PAYMENT_FAILED = "payment_failed"
    CHAMPION_CHANGED = "champion_changed"
    TICKET_SPIKE = "ticket_spike"
    MILESTONE_ACHIEVED = "milestone_achieved"
    HEALTH_RED = "health_red"
    HEALTH_GREEN = "health_green"
    NPS_RECOVERED = "nps_recovered"
    USAGE_RECOVERED = "usage_recovered"
    # Time-based, from the durable scheduler (services/ingest/schedule.py).
    USAGE_DROP = "usage_drop"
    INACTIVE = "inactive"
    RENEWAL_180 = "renewal_180"
    RENEWAL_120 = "renewal_120"
    RENEWAL_90 = "renewal_90"
    ONBOARDING_30D = "onboarding_30d"
    QUARTER_START = "quarter_start"
    MONTH_START = "month_start"


class Trigger(BaseModel):
    """A line the view crossed; the decision service reacts to it."""

    name: str
    reason: str
    account_id: str
    user_id: str | None
    cause_event_id: str
    time: datetime
    # Set for time-based triggers: the scheduler job key, which is then the trigger's id.
    key: str | None = None

    @property
    def id(self) -> str:
        return self.key or f"{self.cause_event_id}:{self.name}"


def caused_by(name: str, reason: str, event: Event) -> Trigger:
    return Trigger(
        name=str(name),
        reason=reason,
        account_id=event.account_id,
        user_id=event.user_id,
        cause_event_id=event.id,
        time=event.time,
    )


def to_message(trigger: Trigger) -> Message:
    event = TriggerEvent(
        id=trigger.id,
        source="projector" if trigger.key is None else "scheduler",
        type="nbv.trigger",
        time=trigger.time,
        account_id=trigger.account_id,
        user_id=trigger.user_id,
        payload=TriggerPayload(
            trigger=trigger.name, reason=trigger.reason, cause_event_id=trigger.cause_event_id
        ),
    )
    return Message(key=trigger.account_id, value=encode(event))
