from pathlib import Path

import pytest
import yaml

from services.decision.library import DEFAULT_LIBRARY, LibraryError, load_library

BASE = load_library(DEFAULT_LIBRARY)


def _spec(element_id: str, **over: object) -> dict[str, object]:
    spec = next(e for e in BASE.elements if e.id == element_id).model_dump(mode="json")
    spec.update(over)
    return spec


def test_a_directory_of_files_is_one_library(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"elements": [_spec("create-first-project")]}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"elements": [_spec("invite-teammates")]}))
    library = load_library(tmp_path)
    assert [e.id for e in library.elements] == ["create-first-project", "invite-teammates"]


def test_cross_file_problems_name_the_file_and_element(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"elements": [_spec("invite-teammates")]}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"elements": [_spec("invite-teammates")]}))
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump(
            {"elements": [_spec("welcome-email"), _spec("basics-quiz", effort_minutes=0)]}
        )
    )
    with pytest.raises(LibraryError) as info:
        load_library(tmp_path)
    message = str(info.value)
    assert "c.yaml: element 'basics-quiz' (elements[1]): effort_minutes" in message
    assert "b.yaml: element 'invite-teammates': id: duplicate (also in a.yaml)" in message
    assert (
        "a.yaml: element 'invite-teammates': prerequisites" in message
    )  # needs create-first-project


def test_empty_or_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(LibraryError, match=r"no \*\.yaml files"):
        load_library(tmp_path)
    with pytest.raises(LibraryError, match="no such file"):
        load_library(tmp_path / "nope")


def test_cold_start_pool_exists_for_in_app_and_email() -> None:
    pool = [e for e in BASE.elements if e.stage.value == "onboard" and not e.roles]
    assert {c.value for e in pool for c in e.channels} >= {"in_app", "email"}
