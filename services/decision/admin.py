"""The library admin API: read, edit, retire and import Value Elements, list the versions, and
launch a campaign playbook over a target list. Every change is a new library version."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from services.decision.library import (
    LibraryError,
    ValueElement,
    active_elements,
    current_version,
    import_library,
    put_element,
    retire_element,
)
from services.decision.playbooks import Playbook, Rule
from shared.envelope import Identifier
from shared.runtime import Runtime
from shared.store.models import LibraryVersion

ElementId = Annotated[str, Path(pattern=r"^[a-z0-9]+(-[a-z0-9]+)*$", max_length=100)]


class ElementList(BaseModel):
    library_version: int | None
    elements: list[ValueElement]


class ElementOut(BaseModel):
    library_version: int | None
    element: ValueElement


class LibraryImport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(default="admin api import", max_length=500)
    elements: list[ValueElement] = Field(min_length=1)


class VersionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    version: int
    source: str
    created_at: datetime
    element_count: int


class PlaybookList(BaseModel):
    playbooks: list[Playbook]
    rules: list[Rule]


class Launch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    campaign_id: Identifier = Field(description="idempotency key of this launch")
    user_ids: list[Identifier] = Field(min_length=1, max_length=10_000)


class Launched(BaseModel):
    playbook: str
    scheduled_steps: int
    unknown_users: list[str]


Reload = Callable[[], Awaitable[None]]
Launcher = Callable[[Playbook, Launch], Awaitable[Launched]]
Playbooks = Callable[[], PlaybookList]


def _conflict(exc: BaseException) -> HTTPException:
    return HTTPException(status.HTTP_409_CONFLICT, str(exc))


def admin_router(rt: Runtime, reload: Reload, playbooks: Playbooks, launch: Launcher) -> APIRouter:
    router = APIRouter(prefix="/v1/admin", tags=["admin"])

    @router.get("/elements")
    async def list_elements() -> ElementList:
        async with rt.sessions() as session:
            return ElementList(
                library_version=await current_version(session),
                elements=await active_elements(session),
            )

    @router.get("/elements/{element_id}")
    async def get_element(element_id: ElementId) -> ElementOut:
        async with rt.sessions() as session:
            found = next((e for e in await active_elements(session) if e.id == element_id), None)
            version = await current_version(session)
        if found is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown element {element_id!r}")
        return ElementOut(library_version=version, element=found)

    @router.put("/elements/{element_id}")
    async def put(element_id: ElementId, element: ValueElement) -> ElementOut:
        """Create or replace an element (a new library version)."""
        if element.id != element_id:
            raise HTTPException(
                422,
                f"id: body id {element.id!r} differs from the path's {element_id!r}",
            )
        try:
            async with rt.sessions() as session, session.begin():
                version = await put_element(session, rt.dialect, element, "admin api")
        except LibraryError as exc:
            raise HTTPException(422, str(exc)) from None
        except IntegrityError as exc:  # a concurrent edit took the version number
            raise _conflict(exc.orig or exc) from None
        await reload()
        return ElementOut(library_version=version, element=element)

    @router.delete("/elements/{element_id}")
    async def delete(element_id: ElementId) -> ElementOut:
        """Retire an element (kept in the store for the decision log)."""
        try:
            async with rt.sessions() as session, session.begin():
                current = {e.id: e for e in await active_elements(session)}
                version = await retire_element(session, element_id, "admin api")
        except LibraryError as exc:
            raise _conflict(exc) from None
        if version is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown element {element_id!r}")
        await reload()
        return ElementOut(library_version=version, element=current[element_id])

    @router.post("/library/import")
    async def import_(body: LibraryImport) -> ElementList:
        """Replace the active library with these elements (a new version; history is kept)."""
        try:
            async with rt.sessions() as session, session.begin():
                version = await import_library(session, rt.dialect, body.elements, body.source)
        except LibraryError as exc:
            raise HTTPException(422, str(exc)) from None
        except IntegrityError as exc:
            raise _conflict(exc.orig or exc) from None
        await reload()
        return ElementList(library_version=version, elements=body.elements)

    @router.get("/library/versions")
    async def versions() -> list[VersionOut]:
        async with rt.sessions() as session:
            rows = await session.scalars(
                select(LibraryVersion).order_by(LibraryVersion.version.desc()).limit(100)
            )
            return [VersionOut.model_validate(r) for r in rows]

    @router.get("/playbooks")
    async def list_playbooks() -> PlaybookList:
        return playbooks()

    @router.post("/playbooks/{name}/launch", status_code=status.HTTP_202_ACCEPTED)
    async def launch_playbook(name: str, body: Launch) -> Launched:
        """Run a playbook (e.g. a campaign) over a target list of people."""
        found = next((p for p in playbooks().playbooks if p.name == name), None)
        if found is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown playbook {name!r}")
        return await launch(found, body)

    return router
