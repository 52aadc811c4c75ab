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


class Gate(NamedTuple):
    """What eligibility reads of an element, in the shapes it reads them: built once per
    library, since the rules run over the whole library on every decision."""

    element: ValueElement
    id: str
    achieved_event: str | None
    channels: frozenset[Channel]
    roles: frozenset[str]
    prerequisites: tuple[str, ...]


def gate(element: ValueElement) -> Gate:
    return Gate(
        element,
        element.id,
        element.achieved_event,
        frozenset(element.channels),
        frozenset(r.value for r in element.roles),
        tuple(element.prerequisites),
    )


_NOT_BY = {c: f"not deliverable by {c.value}" for c in Channel}


def evaluate(
    elements: Sequence[ValueElement],
    user: UserState,
    channel: Channel | None,
    library: Sequence[ValueElement] | None = None,
) -> list[Verdict]:
    """Verdicts for ``elements``; prerequisites are looked up in ``library`` (default: the
    same elements), so a single element can be judged against the whole library."""
    return judge(
        [gate(e) for e in elements],
        user,
        channel,
        None if library is None else [gate(e) for e in library],
    )


def screen(
    gates: Sequence[Gate], channel: Channel | None, role: str | None
) -> tuple[Verdict | None, ...]:
    """The verdict of the rules that read only the element, the channel and the role (None
    where the person's own record decides): the same for everyone of a role on a channel, so
    a library keeps one per pair (``LibrarySnapshot.screen``) and ``judge`` reuses it."""
    screened: list[Verdict | None] = []
    for e, _, _, channels, roles, _ in gates:
        if channel is not None and channel not in channels:
            screened.append(Verdict(e, "channel", _NOT_BY[channel]))
        elif roles and role is not None and role not in roles:
            screened.append(Verdict(e, "role", f"not for role {role}"))
        else:
            screened.append(None)
    return tuple(screened)


def judge(
    gates: Sequence[Gate],
    user: UserState,
    channel: Channel | None,
    library: Sequence[Gate] | None = None,
    screened: Sequence[Verdict | None] | None = None,
) -> list[Verdict]:
    """``evaluate`` over gates built beforehand (``LibrarySnapshot.gates``); ``screened``:
    ``screen`` of the same gates for this channel and the person's role."""
    done, tracked, dismissed, role = user.achieved, user.track_events, user.dismissed, user.role
    if screened is None:
        screened = screen(gates, channel, role)
    # Achieved: reported completed, or the event that marks it tracked.
    achieved = {
        g.id
        for g in (gates if library is None else library)
        if g.id in done or (g.achieved_event is not None and g.achieved_event in tracked)
    }
    verdicts: list[Verdict] = []
    append = verdicts.append
    # In the rules' order of precedence: achieved, dismissed, channel, role, prerequisites.
    for (e, id_, _, _, _, prerequisites), fixed in zip(gates, screened, strict=True):
        if id_ in achieved:
            append(Verdict(e, "achieved", "already completed"))
        elif id_ in dismissed:
            append(Verdict(e, "dismissed", f"dismissed at {dismissed[id_]}"))
        elif fixed is not None:
            append(fixed)
        elif prerequisites and (missing := [p for p in prerequisites if p not in achieved]):
            append(Verdict(e, "prerequisites", "needs " + ", ".join(missing)))
        else:
            append(Verdict(e, None))
    return verdicts
