"""The Value Element library: data a CS team edits (YAML), validated, stored, served from memory."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.contracts import ElementContent, Resource
from shared.envelope import Channel, Role
from shared.store.db import upsert
from shared.store.models import ValueElementRow

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

    version: int = Field(ge=1)
    elements: list[ValueElement] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self) -> LibraryFile:
        ids = [e.id for e in self.elements]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate element ids: {', '.join(duplicates)}")
        known = set(ids)
        for e in self.elements:
            missing = [p for p in e.prerequisites if p not in known]
            if missing:
                raise ValueError(f"element {e.id!r}: unknown prerequisites {missing}")
        return self


class LibraryError(ValueError):
    pass


def load_library(path: Path = DEFAULT_LIBRARY) -> LibraryFile:
    try:
        data = yaml.safe_load(path.read_text())
        return LibraryFile.model_validate(data)
    except (OSError, yaml.YAMLError) as exc:
        raise LibraryError(f"{path}: {exc}") from exc
    except ValidationError as exc:
        lines = [
            f"{path}: " + ".".join(str(p) for p in err["loc"]) + f": {err['msg']}"
            for err in exc.errors()
        ]
        raise LibraryError("\n".join(lines)) from exc


async def seed_library(session: AsyncSession, library: LibraryFile, dialect: str) -> bool:
    """Store the file's elements unless the store already holds this version or a newer one."""
    stored = await session.scalar(select(func.max(ValueElementRow.library_version)))
    if stored is not None and stored >= library.version:
        return False
    rows = [
        {
            "id": e.id,
            "library_version": library.version,
            "spec": e.model_dump(mode="json"),
            "active": True,
        }
        for e in library.elements
    ]
    await session.execute(
        upsert(dialect, ValueElementRow, rows, ["id"], ["library_version", "spec", "active"])
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
