from pathlib import Path

import pytest

from services.decision.library import (
    DEFAULT_LIBRARY,
    Kind,
    LibraryError,
    Stage,
    ValueElement,
    load_library,
)
from services.decision.rules import evaluate
from services.ingest.view import new_user
from shared.envelope import Channel, Event, Role
from tests.factories import event

LIBRARY = load_library(DEFAULT_LIBRARY)
BY_ID = {e.id: e for e in LIBRARY.elements}


def test_default_library_covers_kinds_roles_stages() -> None:
    assert len(LIBRARY.elements) >= 30
    assert {e.kind for e in LIBRARY.elements} == set(Kind)
    assert {e.stage for e in LIBRARY.elements} == set(Stage)
    assert {r for e in LIBRARY.elements for r in e.roles} == set(Role)
    for e in LIBRARY.elements:
        assert e.what and e.why and e.how, e.id


def test_library_errors_name_file_element_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "lib.yaml"
    bad.write_text(
        "version: 1\nelements:\n"
        "  - {id: a, title: A, what: w, why: y, how: [{type: link, label: l, url: u}],"
        " kind: podcast, stage: onboard, channels: [in_app], effort_minutes: 5,"
        " value_weight: 0.5}\n"
    )
    with pytest.raises(LibraryError) as info:
        load_library(bad)
    assert "lib.yaml: element 'a' (elements[0]): kind:" in str(info.value)


def test_unknown_prerequisite_is_refused(tmp_path: Path) -> None:
    spec = BY_ID["invite-teammates"].model_dump(mode="json")
    spec["prerequisites"] = ["no-such-element"]
    bad = tmp_path / "lib.yaml"
    import yaml

    bad.write_text(yaml.safe_dump({"version": 1, "elements": [spec]}))
    with pytest.raises(LibraryError, match="unknown prerequisites"):
        load_library(bad)


def _verdicts(
    user_events: list[Event], channel: Channel | None = Channel.IN_APP
) -> dict[str, str | None]:
    from services.ingest.view import apply_to_user

    user = new_user(user_events[0])
    for e in user_events:
        apply_to_user(user, e)
    return {v.element.id: v.excluded_by for v in evaluate(LIBRARY.elements, user, channel)}


def _response(element: str, outcome: str):
    return event("nbv.response", {"decision_id": "d", "element_id": element, "outcome": outcome})


def test_completed_and_dismissed_are_never_offered() -> None:
    v = _verdicts(
        [
            event("user.identify", {"role": "admin"}),
            _response("create-first-project", "completed"),
            _response("connect-first-integration", "dismissed"),
        ]
    )
    assert v["create-first-project"] == "achieved"
    assert v["connect-first-integration"] == "dismissed"


def test_the_achieving_product_event_counts_as_achieved() -> None:
    element = BY_ID["create-first-project"]
    assert element.achieved_event
    v = _verdicts([event("product.track", {"event": element.achieved_event})])
    assert v["create-first-project"] == "achieved"


def test_prerequisites_channel_and_role() -> None:
    v = _verdicts([event("user.identify", {"role": "end_user"})])
    assert v["invite-teammates"] == "prerequisites"  # needs create-first-project
    csm_only = [e.id for e in LIBRARY.elements if e.channels == [Channel.CSM]]
    assert csm_only and all(v[i] == "channel" for i in csm_only)
    admin_only = [
        e.id
        for e in LIBRARY.elements
        if e.roles == [Role.ADMIN] and Channel.IN_APP in e.channels and not e.prerequisites
    ]
    assert admin_only and all(v[i] == "role" for i in admin_only)
    assert any(x is None for x in v.values())


def test_element_schema_rejects_unknown_fields() -> None:
    spec = BY_ID["invite-teammates"].model_dump(mode="json") | {"colour": "red"}
    with pytest.raises(ValueError, match="colour"):
        ValueElement.model_validate(spec)


def test_a_library_screens_each_channel_and_role_once_and_keeps_the_rules_precedence() -> None:
    from services.decision.engine import MAX_SCREENS, LibrarySnapshot
    from services.decision.rules import judge_library
    from services.ingest.view import apply_to_user

    snapshot = LibrarySnapshot.of(1, LIBRARY.elements)
    csm_only = next(e.id for e in LIBRARY.elements if e.channels == [Channel.CSM])
    admin_only = next(e.id for e in LIBRARY.elements if e.roles == [Role.ADMIN])
    user = new_user(event("user.identify", {"role": "end_user"}))
    for e in (
        event("user.identify", {"role": "end_user"}),
        _response(csm_only, "completed"),
        _response(admin_only, "dismissed"),
    ):
        apply_to_user(user, e)

    screened = snapshot.screen(Channel.IN_APP, "end_user")
    assert snapshot.screen(Channel.IN_APP, "end_user") is screened  # built once
    judged = judge_library(snapshot.gates, snapshot.index, snapshot.by_event, user, screened)
    by_id = {v.element.id: (v.excluded_by, v.detail) for v in judged.verdicts}
    for rule, detail, ids in judged.screened:
        by_id.update(dict.fromkeys(ids, (rule, detail)))
    # The person's own record comes before what the channel and the role rule out.
    assert by_id[csm_only] == ("achieved", "already completed")
    assert by_id[admin_only][0] == "dismissed"
    assert by_id == {
        v.element.id: (v.excluded_by, v.detail)
        for v in evaluate(LIBRARY.elements, user, Channel.IN_APP)
    }
    # Roles come from the view: unexpected ones are screened but not kept beyond the bound.
    for n in range(2 * MAX_SCREENS):
        assert len(snapshot.screen(Channel.EMAIL, f"role-{n}").verdicts) == len(LIBRARY.elements)
    assert len(snapshot.screens) == MAX_SCREENS
