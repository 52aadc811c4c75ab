"""Eligibility rules: which elements may be offered to this person, and why not the others.

These run before the ranker, so the ranker never sees an ineligible element.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
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
    a library keeps one per pair (``LibrarySnapshot.screen``, as a ``Screen``)."""
    screened: list[Verdict | None] = []
    for e, _, _, channels, roles, _ in gates:
        if channel is not None and channel not in channels:
            screened.append(Verdict(e, "channel", _NOT_BY[channel]))
        elif roles and role is not None and role not in roles:
            screened.append(Verdict(e, "role", f"not for role {role}"))
        else:
            screened.append(None)
    return tuple(screened)


class Screen(NamedTuple):
    """``screen`` of a library's gates for one channel and role, in the shapes
    ``judge_library`` reads: the gates the person's own record decides, and the others by the
    verdict that excludes them (most of a library, for most people)."""

    verdicts: tuple[Verdict | None, ...]
    open: tuple[int, ...]  # the gates no fixed rule excludes, in library order
    excluded: tuple[tuple[str, str, tuple[int, ...], tuple[str, ...]], ...]  # rule, detail,
    # its gates and their element ids


def screen_library(gates: Sequence[Gate], channel: Channel | None, role: str | None) -> Screen:
    verdicts = screen(gates, channel, role)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, verdict in enumerate(verdicts):
        if verdict is not None and verdict.excluded_by is not None:
            groups.setdefault((verdict.excluded_by, verdict.detail), []).append(i)
    return Screen(
        verdicts,
        tuple(i for i, verdict in enumerate(verdicts) if verdict is None),
        tuple(
            (rule, detail, tuple(ix), tuple(gates[i].id for i in ix))
            for (rule, detail), ix in groups.items()
        ),
    )


def _verdict(
    g: Gate, fixed: Verdict | None, achieved: Set[str], dismissed: Mapping[str, str]
) -> Verdict:
    # In the rules' order of precedence: achieved, dismissed, channel, role, prerequisites.
    e, id_, prerequisites = g.element, g.id, g.prerequisites
    if id_ in achieved:
        return Verdict(e, "achieved", "already completed")
    if id_ in dismissed:
        return Verdict(e, "dismissed", f"dismissed at {dismissed[id_]}")
    if fixed is not None:
        return fixed
    if prerequisites and (missing := [p for p in prerequisites if p not in achieved]):
        return Verdict(e, "prerequisites", "needs " + ", ".join(missing))
    return Verdict(e, None)


def judge(
    gates: Sequence[Gate],
    user: UserState,
    channel: Channel | None,
    library: Sequence[Gate] | None = None,
) -> list[Verdict]:
    """``evaluate`` over gates built beforehand (``LibrarySnapshot.gates``)."""
    done, tracked = user.achieved, user.track_events
    # Achieved: reported completed, or the event that marks it tracked.
    achieved = {
        g.id
        for g in (gates if library is None else library)
        if g.id in done or (g.achieved_event is not None and g.achieved_event in tracked)
    }
    return [
        _verdict(g, fixed, achieved, user.dismissed)
        for g, fixed in zip(gates, screen(gates, channel, user.role), strict=True)
    ]


def marks_by_event(gates: Sequence[Gate]) -> dict[str, tuple[int, ...]]:
    """The positions of the gates each achieved event marks (``judge_library``'s ``by_event``)."""
    marks: dict[str, list[int]] = {}
    for i, g in enumerate(gates):
        if g.achieved_event is not None:
            marks.setdefault(g.achieved_event, []).append(i)
    return {event: tuple(at) for event, at in marks.items()}


class LibraryVerdicts(NamedTuple):
    # The verdicts the person's record decides (their open gates, and what they achieved or
    # dismissed), in library order; the others as (rule, detail, element ids).
    verdicts: list[Verdict]
    screened: list[tuple[str, str, Sequence[str]]]


def judge_library(
    gates: Sequence[Gate],
    index: Mapping[str, int],
    by_event: Mapping[str, tuple[int, ...]],
    user: UserState,
    screened: Screen,
) -> LibraryVerdicts:
    """``judge`` of a whole library (``index``: each gate's position by element id,
    ``by_event``: the gates each achieved event marks) for a person, with ``screened`` for
    their channel and role. Equal to ``judge``'s verdicts; per decision it costs what the
    person's record and the open gates hold, not the library's size."""
    dismissed = user.dismissed
    achieved_at = {index[i] for i in user.achieved if i in index}
    tracked = user.track_events
    if len(tracked) <= len(by_event):
        for event in tracked:
            achieved_at.update(by_event.get(event, ()))
    else:  # a record of many distinct events: look up the few that mark elements
        for event, marked in by_event.items():
            if event in tracked:
                achieved_at.update(marked)
    achieved = {gates[i].id for i in achieved_at}
    special = achieved_at.union(index[i] for i in dismissed if i in index)
    at = screened.open if not special else sorted(special.union(screened.open))
    fixed = screened.verdicts
    verdicts = [_verdict(gates[i], fixed[i], achieved, dismissed) for i in at]
    if not special:
        return LibraryVerdicts(verdicts, [(r, d, ids) for r, d, _, ids in screened.excluded])
    rest = [
        (rule, detail, [gates[i].id for i in ix if i not in special])
        for rule, detail, ix, _ in screened.excluded
    ]
    return LibraryVerdicts(verdicts, [group for group in rest if group[2]])
