from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from services.decision.contact_policy import (
    ContactHistory,
    ContactLimits,
    ContactPolicy,
    Offer,
    QuietWindow,
    history_horizon,
    parse_history,
    quiet_window,
)
from services.decision.library import DEFAULT_LIBRARY, load_library
from shared.envelope import Channel

LIB = {e.id: e for e in load_library(DEFAULT_LIBRARY).elements}
# 12:00 UTC = 13:00 in Paris: outside the default quiet hours.
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
LIMITS = ContactLimits(
    cap_per_day={"email": 1, "csm": 2},
    cap_per_week={"email": 2},
    dismissal_suppression=timedelta(hours=72),
    quiet_start=time(21),
    quiet_end=time(8),
    csm_alerts_per_day=3,
    withdrawn_cooldown=timedelta(days=14),
)
POLICY = ContactPolicy(LIMITS)
EMAIL_ONLY = LIB["welcome-email"]  # email only, cooldown 3 d
MULTI = LIB["invite-teammates"]  # in_app, email


def hist(**kw: object) -> ContactHistory:
    base: dict[str, object] = {"quiet": quiet_window(LIMITS, "Europe/Paris", None)}
    base.update(kw)
    return ContactHistory(**base)  # type: ignore[arg-type]


def test_daily_and_weekly_caps_per_channel() -> None:
    one_today = hist(offers=[Offer("x", "email", NOW - timedelta(hours=2))])
    assert POLICY.channel_exclusion(Channel.EMAIL, one_today, NOW).rule == "cap_day"  # type: ignore[union-attr]
    assert POLICY.channel_exclusion(Channel.IN_APP, one_today, NOW) is None  # not capped
    two_this_week = hist(offers=[Offer("x", "email", NOW - timedelta(days=d)) for d in (2, 5)])
    assert POLICY.channel_exclusion(Channel.EMAIL, two_this_week, NOW).rule == "cap_week"  # type: ignore[union-attr]
    old = hist(offers=[Offer("x", "email", NOW - timedelta(days=8))])
    assert POLICY.channel_exclusion(Channel.EMAIL, old, NOW) is None


def test_items_of_the_same_decision_count_against_the_cap() -> None:
    assert POLICY.channel_exclusion(Channel.EMAIL, hist(), NOW) is None
    used = Counter({"email": 1})
    assert POLICY.channel_exclusion(Channel.EMAIL, hist(), NOW, used).rule == "cap_day"  # type: ignore[union-attr]


def test_cooldown_and_pending_offer() -> None:
    recent = hist(offers=[Offer(EMAIL_ONLY.id, "email", NOW - timedelta(days=2))])
    excluded = POLICY.element_exclusion(EMAIL_ONLY, recent, NOW)
    assert excluded is not None and excluded.rule == "cooldown"
    later = NOW + timedelta(days=EMAIL_ONLY.cooldown_days)
    assert POLICY.element_exclusion(EMAIL_ONLY, recent, later) is None
    pending = hist(open_elements={MULTI.id})
    assert POLICY.element_exclusion(MULTI, pending, NOW).rule == "pending"  # type: ignore[union-attr]


def test_dismissal_suppresses_email_for_a_while() -> None:
    h = hist(last_dismissal=NOW - timedelta(hours=10))
    assert POLICY.channel_exclusion(Channel.EMAIL, h, NOW).rule == "dismissal_suppression"  # type: ignore[union-attr]
    assert POLICY.channel_exclusion(Channel.IN_APP, h, NOW) is None
    assert POLICY.channel_exclusion(Channel.EMAIL, h, NOW + timedelta(days=3)) is None


def test_quiet_hours_in_the_users_timezone_for_push_channels_only() -> None:
    tokyo = hist(quiet=quiet_window(LIMITS, "Asia/Tokyo", None))  # 12:00 UTC = 21:00 Tokyo
    assert POLICY.channel_exclusion(Channel.EMAIL, tokyo, NOW).rule == "quiet_hours"  # type: ignore[union-attr]
    assert POLICY.channel_exclusion(Channel.CSM, tokyo, NOW).rule == "quiet_hours"  # type: ignore[union-attr]
    assert POLICY.channel_exclusion(Channel.IN_APP, tokyo, NOW) is None
    assert POLICY.channel_exclusion(Channel.EMAIL, hist(), NOW) is None  # Paris: 13:00
    end = tokyo.quiet.ends_after(NOW)  # type: ignore[union-attr]
    assert end.astimezone(ZoneInfo("Asia/Tokyo")).hour == 8 and end > NOW


def test_preference_quiet_hours_override_the_default() -> None:
    q = quiet_window(LIMITS, "UTC", {"start": "11:00:00", "end": "13:00:00"})
    assert q.contains(NOW) and not q.contains(NOW + timedelta(hours=2))
    wrap = QuietWindow(time(22), time(6), ZoneInfo("UTC"))
    assert wrap.contains(NOW.replace(hour=23)) and wrap.contains(NOW.replace(hour=3))
    assert not wrap.contains(NOW)


def test_csm_cap_per_csm_per_day() -> None:
    busy = hist(csm_id="csm-1", csm_alerts_last_day=3)
    blocked = POLICY.channel_exclusion(Channel.CSM, busy, NOW)
    assert blocked is not None and blocked.rule == "csm_cap" and "csm-1" in blocked.detail
    assert POLICY.channel_exclusion(Channel.CSM, hist(csm_alerts_last_day=2), NOW) is None


def test_resolve_falls_back_to_the_next_allowed_channel() -> None:
    # invite-teammates lists in_app first, then email; in_app turned off → email.
    h = hist(channel_allowed={"in_app": False})
    channel, excluded = POLICY.resolve(MULTI, None, h, NOW)
    assert channel is Channel.EMAIL and excluded is None
    # Nothing left: the first channel's reason is reported.
    h2 = hist(channel_allowed={"in_app": False}, offers=[Offer("x", "email", NOW)])
    channel, excluded = POLICY.resolve(MULTI, None, h2, NOW)
    assert channel is None and excluded is not None and excluded.rule == "opted_out"
    # A requested channel is never swapped for another.
    channel, excluded = POLICY.resolve(MULTI, Channel.IN_APP, h, NOW)
    assert channel is None and excluded is not None


def test_history_horizon_covers_the_longest_cooldown() -> None:
    assert history_horizon(LIB.values()) == timedelta(
        days=max(e.cooldown_days for e in LIB.values())
    )
    assert history_horizon([]) == timedelta(days=7)


def test_a_withdrawn_card_holds_its_element_back_for_the_cool_down() -> None:
    # The element's own cool-down (from its offer) has run out; the card was withdrawn after
    # impressions without an answer five days ago.
    withdrawn = hist(
        offers=[Offer(MULTI.id, "in_app", NOW - timedelta(days=60))],
        withdrawn={MULTI.id: NOW - timedelta(days=5)},
    )
    channel, excluded = POLICY.resolve(MULTI, Channel.IN_APP, withdrawn, NOW)
    assert channel is None and excluded is not None and excluded.rule == "withdrawn"
    assert "cool-down 14 d" in excluded.detail
    assert POLICY.element_exclusion(MULTI, withdrawn, NOW + timedelta(days=9)) is None
    # Other elements are not held back, and with no cool-down configured nothing is.
    assert POLICY.element_exclusion(EMAIL_ONLY, withdrawn, NOW) is None
    unlimited = ContactPolicy(replace(LIMITS, withdrawn_cooldown=timedelta(0)))
    assert unlimited.element_exclusion(MULTI, withdrawn, NOW) is None


def test_parse_history_reads_offers_open_and_withdrawn_cards() -> None:
    parsed = parse_history(
        [
            ["c", "a", "email", "2026-11-19T10:00:00"],
            ["o", "b", None, None],
            ["w", "c", None, "2026-11-18T09:00:00+01:00"],
        ]
    )
    assert parsed.offers == [Offer("a", "email", datetime(2026, 11, 19, 10, tzinfo=UTC))]
    assert parsed.open_elements == {"b"}
    assert parsed.withdrawn == {"c": datetime(2026, 11, 18, 8, tzinfo=UTC)}
    assert parse_history(None).withdrawn == {}
