"""Survey answers (NPS 0–10, CSAT 1–5) → ``survey.nps`` / ``survey.csat`` events."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from services.ingest.adapters import content_id
from shared.envelope import (
    CsatEvent,
    CsatPayload,
    Identifier,
    InboundEvent,
    NpsEvent,
    NpsPayload,
)

SOURCE = "surveys"


class SurveyResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Without one, a hash of the body: a retry of the same body is deduplicated.
    id: Identifier | None = None
    time: AwareDatetime | None = None
    account_id: Identifier
    user_id: Identifier | None = None
    kind: Literal["nps", "csat"]
    score: Annotated[int, Field(ge=0, le=10)]
    comment: Annotated[str | None, Field(max_length=5_000)] = None
    ticket_id: Identifier | None = None

    @model_validator(mode="after")
    def _scale(self) -> SurveyResponse:
        if self.kind == "csat" and not 1 <= self.score <= 5:
            raise ValueError("score: a CSAT answer is 1–5")
        if self.kind == "nps" and self.user_id is None:
            raise ValueError("user_id: an NPS answer belongs to a person")
        return self


def to_event(answer: SurveyResponse) -> InboundEvent:
    at = answer.time or datetime.now(UTC)
    if answer.kind == "nps":
        assert answer.user_id is not None
        return NpsEvent(
            id=answer.id or content_id(SOURCE, answer),
            source=SOURCE,
            type="survey.nps",
            time=at,
            account_id=answer.account_id,
            user_id=answer.user_id,
            payload=NpsPayload(score=answer.score, comment=answer.comment),
        )
    return CsatEvent(
        id=answer.id or content_id(SOURCE, answer),
        source=SOURCE,
        type="survey.csat",
        time=at,
        account_id=answer.account_id,
        user_id=answer.user_id,
        payload=CsatPayload(score=answer.score, ticket_id=answer.ticket_id, comment=answer.comment),
    )
