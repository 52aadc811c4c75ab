"""What every external channel gets to send, and how it says a send failed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from shared.contracts import DecidedItem, DecisionMessage


class SendFailed(Exception):
    """A send that did not go through. ``transient`` failures are retried with backoff;
    the others (a refused recipient, a 4xx from the receiver) go straight to dead."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class Person:
    """The recipient as the view knows them, read at send time (addresses change)."""

    user_id: str
    account_id: str
    email: str | None
    name: str | None
    role: str | None
    timezone: str | None


@dataclass(frozen=True)
class Outbound:
    delivery_id: str
    decision: DecisionMessage  # carries exactly the one item being delivered
    person: Person
    account: dict[str, Any]
    now: datetime

    @property
    def item(self) -> DecidedItem:
        return self.decision.items[0]


class Channel(Protocol):
    async def send(self, outbound: Outbound) -> None: ...
