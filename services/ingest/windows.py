"""Daily usage buckets: exact 1/7/28-day windows and week-over-week change from day counts.

A bucket is keyed by the UTC day of the *event* time, so a late event lands in its own day.
Buckets older than the retention (two 28-day windows plus the allowed lateness, counted back from
the newest event seen) are dropped, and an event older than that is not bucketed. Both rules
depend only on the set of events, not on their order, so a replay rebuilds the same buckets.

These run several times per event in the projector, so the day strings a window spans are
computed once per (day, length) and the sums run over dict lookups rather than over every bucket.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from functools import lru_cache

WINDOW_DAYS = (1, 7, 28)
_LONGEST = 2 * max(WINDOW_DAYS)
# Per feature area the view keeps the days the ranker's recency reads (the last 7 days against
# the 7 before), not the whole-product 2 × 28: there are several areas per person, and every
# day kept is written with the person's row on each batch.
AREA_WINDOW_DAYS = 14


@lru_cache(maxsize=8_192)
def iso_day(day: date) -> str:
    return day.isoformat()


def day_key(at: datetime) -> str:
    return iso_day(at.date())


@lru_cache(maxsize=8_192)
def _floor(newest: date, keep_days: int) -> str:
    return (newest - timedelta(days=keep_days)).isoformat()


@lru_cache(maxsize=8_192)
def _days(end: date, days: int) -> tuple[str, ...]:
    """The keys of the ``days`` days ending with ``end`` (inclusive)."""
    return tuple((end - timedelta(days=i)).isoformat() for i in range(days))


def retention_days(max_lateness: timedelta, window_days: int = _LONGEST) -> int:
    """Days of buckets kept behind the newest event: the window read plus the lateness."""
    return window_days + max(0, max_lateness.days) + 1


def add(buckets: dict[str, int], at: datetime, newest: datetime, keep_days: int) -> bool:
    """Count one event in its day; False if it is older than the retention (not bucketed).

    Returns True also when the day already had events; callers that need "first event of the
    day" compare the count before and after.
    """
    floor = _floor(newest.date(), keep_days)
    key = day_key(at)
    if key < floor:
        return False
    buckets[key] = buckets.get(key, 0) + 1
    # Every key is at or above the floor after each add, so the oldest key alone says whether
    # the floor moved past any (ISO days sort like the days they name).
    if min(buckets) < floor:
        prune(buckets, newest, keep_days)
    return True


def prune(buckets: dict[str, int], newest: datetime, keep_days: int) -> None:
    floor = _floor(newest.date(), keep_days)
    for key in [k for k in buckets if k < floor]:
        del buckets[key]


def total(buckets: dict[str, int], end: date, days: int) -> int:
    """Events on the ``days`` days ending with ``end`` (inclusive)."""
    return sum(filter(None, map(buckets.get, _days(end, days))))


def active_days(buckets: dict[str, int], end: date, days: int) -> int:
    # Counts are positive (buckets are only ever incremented), so "has a count" is "active".
    return len(list(filter(None, map(buckets.get, _days(end, days)))))


def week_over_week(buckets: dict[str, int], end: date) -> float | None:
    """Change of the last 7 days against the 7 before, in percent; None without a baseline."""
    this_week = total(buckets, end, 7)
    last_week = total(buckets, end - timedelta(days=7), 7)
    if last_week == 0:
        return None
    return round(100.0 * (this_week - last_week) / last_week, 2)
