"""Daily usage buckets: exact 1/7/28-day windows and week-over-week change from day counts.

A bucket is keyed by the UTC day of the *event* time, so a late event lands in its own day.
Buckets older than the retention (two 28-day windows plus the allowed lateness, counted back from
the newest event seen) are dropped, and an event older than that is not bucketed. Both rules
depend only on the set of events, not on their order, so a replay rebuilds the same buckets.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta

WINDOW_DAYS = (1, 7, 28)
_LONGEST = 2 * max(WINDOW_DAYS)


def day_key(at: datetime) -> str:
    return at.date().isoformat()


def retention_days(max_lateness: timedelta) -> int:
    return _LONGEST + max(0, max_lateness.days) + 1


def add(buckets: dict[str, int], at: datetime, newest: datetime, keep_days: int) -> bool:
    """Count one event in its day; False if it is older than the retention (not bucketed).

    Returns True also when the day already had events; callers that need "first event of the
    day" compare the count before and after.
    """
    floor = (newest.date() - timedelta(days=keep_days)).isoformat()
    key = day_key(at)
    if key < floor:
        return False
    buckets[key] = buckets.get(key, 0) + 1
    prune(buckets, newest, keep_days)
    return True


def prune(buckets: dict[str, int], newest: datetime, keep_days: int) -> None:
    floor = (newest.date() - timedelta(days=keep_days)).isoformat()
    for key in [k for k in buckets if k < floor]:
        del buckets[key]


def total(buckets: dict[str, int], end: date, days: int) -> int:
    """Events on the ``days`` days ending with ``end`` (inclusive)."""
    start = (end - timedelta(days=days - 1)).isoformat()
    stop = end.isoformat()
    return sum(n for k, n in buckets.items() if start <= k <= stop)


def active_days(buckets: dict[str, int], end: date, days: int) -> int:
    start = (end - timedelta(days=days - 1)).isoformat()
    stop = end.isoformat()
    return sum(1 for k, n in buckets.items() if start <= k <= stop and n > 0)


def week_over_week(buckets: dict[str, int], end: date) -> float | None:
    """Change of the last 7 days against the 7 before, in percent; None without a baseline."""
    this_week = total(buckets, end, 7)
    last_week = total(buckets, end - timedelta(days=7), 7)
    if last_week == 0:
        return None
    return round(100.0 * (this_week - last_week) / last_week, 2)
