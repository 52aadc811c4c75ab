from datetime import UTC, datetime, time

import pytest
from pydantic import ValidationError

from services.delivery.preferences import Preferences, QuietHours, choose_channel, quiet_until
from shared.envelope import Channel

EMAIL, IN_APP, CSM = Channel.EMAIL, Channel.IN_APP, Channel.CSM


def choose(requested, allowed, prefs=None, *, has_email=True, csm=True, kind="guide"):
    return choose_channel(
        requested,
        allowed,
        kind=kind,
        element_id="e1",
        prefs=prefs or Preferences(),
        has_email=has_email,
        csm_configured=csm,
    )


def test_requested_channel_is_used_when_allowed() -> None:
    choice = choose(EMAIL, [EMAIL, IN_APP])
    assert choice.channel is EMAIL and choice.reason == ""


def test_opted_out_channel_falls_back_to_the_elements_next_channel() -> None:
    prefs = Preferences(channels={EMAIL: False})
    choice = choose(EMAIL, [EMAIL, CSM], prefs)
    assert choice.channel is CSM and "email disabled" in choice.reason


def test_no_email_address_falls_back_in_app_even_if_the_element_is_email_only() -> None:
    choice = choose(EMAIL, [EMAIL], has_email=False)
    assert choice.channel is IN_APP and "no email address" in choice.reason


def test_nothing_allowed_is_skipped_with_every_reason() -> None:
    prefs = Preferences(channels={EMAIL: False, IN_APP: False})
    choice = choose(EMAIL, [EMAIL], prefs)
    assert choice.channel is None
    assert "email disabled" in choice.reason and "in_app disabled" in choice.reason


def test_csm_alert_without_webhook_does_not_land_in_app_unless_the_element_allows_it() -> None:
    assert choose(CSM, [CSM], csm=False).channel is None
    assert choose(CSM, [CSM, IN_APP], csm=False).channel is IN_APP


def test_opt_outs_by_kind_and_element() -> None:
    assert choose(IN_APP, [IN_APP], Preferences(opted_out_kinds=["guide"])).channel is None
    choice = choose(IN_APP, [IN_APP], Preferences(opted_out_elements=["e1"]))
    assert choice.channel is None and "e1" in choice.reason


def test_quiet_hours_wrapping_midnight_in_the_persons_zone() -> None:
    quiet = QuietHours(start=time(22), end=time(7), timezone="Europe/Paris")
    # 21:30 UTC = 22:30 in Paris (winter): quiet until 07:00 Paris = 06:00 UTC next day.
    assert quiet_until(quiet, None, datetime(2026, 11, 23, 21, 30, tzinfo=UTC)) == datetime(
        2026, 11, 24, 6, tzinfo=UTC
    )
    # 05:00 UTC = 06:00 Paris: still quiet, until 06:00 UTC the same day.
    assert quiet_until(quiet, None, datetime(2026, 11, 24, 5, tzinfo=UTC)) == datetime(
        2026, 11, 24, 6, tzinfo=UTC
    )
    assert quiet_until(quiet, None, datetime(2026, 11, 24, 12, tzinfo=UTC)) is None


def test_quiet_hours_default_to_the_views_timezone() -> None:
    quiet = QuietHours(start=time(12), end=time(14))
    noon_utc = datetime(2026, 11, 24, 12, 30, tzinfo=UTC)
    assert quiet_until(quiet, "UTC", noon_utc) == datetime(2026, 11, 24, 14, tzinfo=UTC)
    assert quiet_until(quiet, "America/New_York", noon_utc) is None  # 07:30 there
    assert quiet_until(None, "UTC", noon_utc) is None


def test_preferences_are_validated() -> None:
    with pytest.raises(ValidationError, match="unknown timezone"):
        QuietHours(start=time(1), end=time(2), timezone="Nowhere/Town")
    with pytest.raises(ValidationError, match="end must differ"):
        QuietHours(start=time(1), end=time(1))
    with pytest.raises(ValidationError):
        Preferences.model_validate({"channels": {"pigeon": True}})
    with pytest.raises(ValidationError):
        Preferences.model_validate({"unknown": 1})
