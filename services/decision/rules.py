"""Eligibility rules: which elements may be offered to this person, and why not the others.

These run before the ranker, so the ranker never sees an ineligible element.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from services.decision.library import ValueElement
from services.ingest.view import UserState
from shared.envelope import Channel


class Verdict(NamedTuple):  # a tuple: one per library element on every decision
    element: ValueElement
    excluded_by: str | None  # rule name, None when eligible
    detail: str = ""


def is_achieved(element: ValueElement, user: UserState) -> bool:
    if element.id in user.achieved:
        return True
    return element.achieved_event is not None and element.achieved_event in user.track_events


def evaluate(
    elements: Sequence[ValueElement],
    user: UserState,
    channel: Channel | None,
    library: Sequence[ValueElement] | None = None,
) -> list[Verdict]:
    """Verdicts for ``elements``; prerequisites are looked up in ``library`` (default: the
    same elements), so a single element can be judged against the whole library."""
    done, tracked = user.achieved, user.track_events
    # is_achieved, inlined: this runs over the whole library on every decision.
    achieved = {
        e.id
        for e in (elements if library is None else library)
        if e.id in done or (e.achieved_event is not None and e.achieved_event in tracked)
    }
    verdicts: list[Verdict] = []
    for e in elements:
        if e.id in achieved:
            verdicts.append(Verdict(e, "achieved", "already completed"))
        elif e.id in user.dismissed:
            verdicts.append(Verdict(e, "dismissed", f"dismissed at {user.dismissed[e.id]}"))
        elif channel is not None and channel not in e.channels:
            verdicts.append(Verdict(e, "channel", f"not deliverable by {channel.value}"))
        elif e.roles and user.role is not None and user.role not in e.roles:
            verdicts.append(Verdict(e, "role", f"not for role {user.role}"))
        elif e.prerequisites and (missing := [p for p in e.prerequisites if p not in achieved]):
            verdicts.append(Verdict(e, "prerequisites", "needs " + ", ".join(missing)))
        else:
            verdicts.append(Verdict(e, None))
    return verdicts
