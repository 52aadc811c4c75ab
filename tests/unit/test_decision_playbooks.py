from pathlib import Path

import pytest

from services.decision.arbitration import apply_rules, final_scores
from services.decision.library import DEFAULT_LIBRARY, load_library
from services.decision.playbooks import (
    Condition,
    PlaybookError,
    load_playbooks,
    step_key,
    step_prefix,
)
from shared.envelope import Channel

PLAYBOOKS = load_playbooks()
LIBRARY = load_library(DEFAULT_LIBRARY)


def test_every_playbook_of_the_design_ships_and_refers_to_real_elements() -> None:
    triggers = {t for p in PLAYBOOKS.playbooks for t in p.triggers}
    for name in (
        "contract_signed",  # onboarding
        "onboarding_30d",  # adoption
        "usage_drop",
        "champion_changed",
        "nps_detractor",
        "renewal_180",
        "renewal_120",
        "renewal_90",
        "quarter_start",
        "month_start",
        "campaign_release",
    ):
        assert name in triggers, name
    assert PLAYBOOKS.check_elements(LIBRARY.elements) == []
    for p in PLAYBOOKS.playbooks:
        assert all(s.owner in ("automated", "csm") for s in p.steps)


def test_usage_drop_is_day_1_4_9_and_cancelled_by_recovery() -> None:
    (drop,) = PLAYBOOKS.for_trigger("usage_drop")
    assert [s.delay_hours / 24 for s in drop.steps] == [1, 4, 9]
    assert [s.channel for s in drop.steps] == [Channel.EMAIL, Channel.CSM, Channel.CSM]
    assert [s.owner for s in drop.steps] == ["automated", "csm", "csm"]
    assert drop in PLAYBOOKS.cancelled_by("usage_recovered")


def test_step_keys_share_the_cancel_prefix() -> None:
    key = step_key("usage-drop", "u1", "t-9", "day4-csm-email")
    assert key == "playbook:usage-drop:u1:t-9:day4-csm-email"
    assert key.startswith(step_prefix("usage-drop", "u1"))
    assert not key.startswith(step_prefix("usage-drop", "u"))  # no prefix collision


def test_conditions_and_audience() -> None:
    assert Condition(fact="mrr", op=">=", value=1000).holds({"mrr": 1500.0})
    assert not Condition(fact="mrr", op=">=", value=1000).holds({"mrr": 10.0})
    assert not Condition(fact="mrr", op=">=", value=1000).holds({})  # unknown never holds
    assert Condition(fact="stage", op="in", value=["renew"]).holds({"stage": "renew"})
    assert not Condition(fact="stage", op="<", value=3).holds({"stage": "renew"})  # type clash
    (qbr,) = PLAYBOOKS.for_trigger("quarter_start")
    assert qbr.audience.admits("economic_buyer", {"mrr": 5000.0})
    assert not qbr.audience.admits("economic_buyer", {"mrr": 50.0})
    assert not qbr.audience.admits("end_user", {"mrr": 5000.0})


def test_rules_require_boost_and_exclude() -> None:
    effects = apply_rules(PLAYBOOKS.rules, {"is_detractor": 1.0, "days_to_renewal": 60.0})
    assert "nps-detractor-outreach" in effects.required
    assert effects.excluded["referral-ask"] == "no-upsell-when-unhappy"
    assert effects.lever_of("roi-review") == 1.5 and effects.lever_of("welcome-email") == 1.0
    calm = apply_rules(PLAYBOOKS.rules, {"is_detractor": 0.0})
    assert calm.fired == () and not calm.required and not calm.excluded
    assert final_scores([0.5, 0.2], [0.8, 1.0], [1.5, 1.0]) == pytest.approx([0.6, 0.2])


def test_bad_playbook_files_are_refused_with_file_and_field(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "playbooks:\n  - name: x\n    triggers: [usage_drop]\n"
        "    steps: [{name: s, element: e, channel: fax}]\n"
    )
    with pytest.raises(PlaybookError, match=r"a\.yaml: playbooks\.0\.steps\.0\.channel"):
        load_playbooks(tmp_path)
    (tmp_path / "a.yaml").write_text("rules:\n  - {name: r, boost: {e: 2}}\n")
    (tmp_path / "b.yaml").write_text("rules:\n  - {name: r, exclude: [e]}\n")
    with pytest.raises(PlaybookError, match="duplicate"):
        load_playbooks(tmp_path)
