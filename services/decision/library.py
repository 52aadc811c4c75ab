"""The Value Element library: data a CS team edits (YAML), validated, stored, served from memory."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from shared.contracts import ElementContent, Resource
from shared.envelope import Channel, Role
from shared.store.db import upsert
from shared.store.models import LibraryVersion, ValueElementRow

DEFAULT_LIBRARY = Path(__file__).with_name("library") / "default.yaml"


class Kind(StrEnum):
    WALKTHROUGH = "walkthrough"
    GUIDE = "guide"
    VIDEO = "video"
    CASE_STUDY = "case_study"
    WORKBOOK = "workbook"
    QUIZ = "quiz"
    WEBINAR = "webinar"
    HUMAN_TOUCH = "human_touch"


class Stage(StrEnum):
    ONBOARD = "onboard"
    ENGAGE = "engage"
    MONITOR = "monitor"
    GROW = "grow"
    RENEW = "renew"


Slug = Annotated[str, Field(pattern=r"^[a-z0-9]+(-[a-z0-9]+)*$", max_length=100)]


class ValueElement(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Slug
    title: str = Field(min_length=1, max_length=120)
    what: str = Field(min_length=1)
    why: str = Field(min_length=1)
    how: list[Resource] = Field(min_length=1)
    kind: Kind
    roles: list[Role] = Field(default_factory=list, description="empty: any role")
    stage: Stage
    channels: list[Channel] = Field(min_length=1)
    prerequisites: list[Slug] = Field(default_factory=list)
    goals: list[Slug] = Field(default_factory=list)
    effort_minutes: int = Field(ge=1, le=240)
    value_weight: float = Field(ge=0, le=1)
    achieved_event: str | None = Field(default=None, pattern=r"^[a-z0-9_]+$")
    cooldown_days: int = Field(default=7, ge=0)
    feature_area: str | None = None

    def content(self) -> ElementContent:
        return ElementContent(
            element_id=self.id,
            title=self.title,
            kind=self.kind.value,
            what=self.what,
            why=self.why,
            how=self.how,
        )


class LibraryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(default=1, ge=1)
    elements: list[ValueElement] = Field(min_length=1)


class LibraryError(ValueError):
    pass


def check_references(
    elements: Sequence[ValueElement], origin: Sequence[str] | None = None
) -> list[str]:
    """Duplicate ids and unknown prerequisites, each problem naming its file and element
    (``origin[i]`` is the file of ``elements[i]``)."""
    where = list(origin) if origin is not None else ["library"] * len(elements)
    problems: list[str] = []
    seen: dict[str, str] = {}
    for e, f in zip(elements, where, strict=True):
        if e.id in seen:
            problems.append(f"{f}: element {e.id!r}: id: duplicate (also in {seen[e.id]})")
        seen.setdefault(e.id, f)
    for e, f in zip(elements, where, strict=True):
        missing = [p for p in e.prerequisites if p not in seen]
        if missing:
            problems.append(
                f"{f}: element {e.id!r}: prerequisites: unknown prerequisites {missing}"
            )
    return problems


def _element_id(data: object, index: object) -> str:
    if isinstance(data, dict) and isinstance(index, int):
        items = data.get("elements")
        if isinstance(items, list) and index < len(items) and isinstance(items[index], dict):
            return str(items[index].get("id", "?"))
    return "?"


def _parse_file(path: Path) -> tuple[LibraryFile | None, list[str]]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        return None, [f"{path.name}: {exc}"]
    try:
        return LibraryFile.model_validate(data), []
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = list(err["loc"])
            if len(loc) >= 2 and loc[0] == "elements" and isinstance(loc[1], int):
                element = _element_id(data, loc[1])
                field = ".".join(str(p) for p in loc[2:]) or "element"
                lines.append(
                    f"{path.name}: element {element!r} (elements[{loc[1]}]): {field}: {err['msg']}"
                )
            else:
                lines.append(f"{path.name}: {'.'.join(str(p) for p in loc)}: {err['msg']}")
        return None, lines


def load_library(path: Path = DEFAULT_LIBRARY) -> LibraryFile:
    """Load one YAML file or every ``*.yaml``/``*.yml`` file of a directory, as one library.

    All problems of all files are reported together, each naming file, element and field.
    """
    if path.is_dir():
        files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
        if not files:
            raise LibraryError(f"{path}: no *.yaml files")
    elif path.exists():
        files = [path]
    else:
        raise LibraryError(f"{path}: no such file or directory")
    problems: list[str] = []
    elements: list[ValueElement] = []
    origin: list[str] = []
    version = 1
    for f in files:
        parsed, errors = _parse_file(f)
        problems.extend(errors)
        if parsed is not None:
            version = max(version, parsed.version)
            origin.extend(f.name for _ in parsed.elements)
            elements.extend(parsed.elements)
    problems.extend(check_references(elements, origin))
    if problems:
        raise LibraryError("\n".join(problems))
    return LibraryFile(version=version, elements=elements)


async def current_version(session: AsyncSession) -> int | None:
    versions = await session.scalar(select(func.max(LibraryVersion.version)))
    rows = await session.scalar(select(func.max(ValueElementRow.library_version)))
    known = [v for v in (versions, rows) if v is not None]
    return max(known) if known else None


async def _record_version(session: AsyncSession, version: int, source: str) -> None:
    active = await active_elements(session)
    session.add(
        LibraryVersion(
            version=version,
            source=source[:500],
            element_count=len(active),
            elements=[e.model_dump(mode="json") for e in active],
        )
    )
    await session.flush()


async def import_library(
    session: AsyncSession,
    dialect: str,
    elements: Sequence[ValueElement],
    source: str,
    *,
    at_least: int = 1,
) -> int:
    """Make ``elements`` the active library as a new version (elements not listed are retired,
    their rows kept); returns the version. The caller commits."""
    problems = check_references(elements)
    if problems:
        raise LibraryError("\n".join(problems))
    version = max(at_least, (await current_version(session) or 0) + 1)
    rows = [
        {"id": e.id, "library_version": version, "spec": e.model_dump(mode="json"), "active": True}
        for e in elements
    ]
    await session.execute(
        upsert(dialect, ValueElementRow, rows, ["id"], ["library_version", "spec", "active"])
    )
    await session.execute(
        update(ValueElementRow)
        .where(ValueElementRow.id.not_in([e.id for e in elements]))
        .values(active=False, library_version=version)
    )
    await _record_version(session, version, source)
    return version


async def put_element(
    session: AsyncSession, dialect: str, element: ValueElement, source: str
) -> int:
    """Create or replace one element as a new library version."""
    active = {e.id: e for e in await active_elements(session)}
    active[element.id] = element
    problems = check_references(list(active.values()))
    if problems:
        raise LibraryError("\n".join(problems))
    version = (await current_version(session) or 0) + 1
    row = {
        "id": element.id,
        "library_version": version,
        "spec": element.model_dump(mode="json"),
        "active": True,
    }
    await session.execute(
        upsert(dialect, ValueElementRow, [row], ["id"], ["library_version", "spec", "active"])
    )
    await _record_version(session, version, source)
    return version


async def retire_element(session: AsyncSession, element_id: str, source: str) -> int | None:
    """Retire an element (kept for the decision log's sake); None if it is not active."""
    active = {e.id: e for e in await active_elements(session)}
    if element_id not in active:
        return None
    dependants = sorted(e.id for e in active.values() if element_id in e.prerequisites)
    if dependants:
        raise LibraryError(
            f"element {element_id!r} is a prerequisite of {', '.join(dependants)}; "
            "change those first"
        )
    version = (await current_version(session) or 0) + 1
    await session.execute(
        update(ValueElementRow)
        .where(ValueElementRow.id == element_id)
        .values(active=False, library_version=version)
    )
    await _record_version(session, version, source)
    return version


async def seed_library(session: AsyncSession, library: LibraryFile, dialect: str) -> bool:
    """Store the shipped library the first time (an imported or edited library is kept)."""
    if await current_version(session) is not None:
        return False
    await import_library(
        session, dialect, library.elements, "default library", at_least=library.version
    )
    return True


async def active_elements(session: AsyncSession) -> list[ValueElement]:
    rows: Sequence[ValueElementRow] = (
        await session.scalars(
            select(ValueElementRow)
            .where(ValueElementRow.active.is_(True))
            .order_by(ValueElementRow.id)
        )
    ).all()
    return [ValueElement.model_validate(r.spec) for r in rows]
