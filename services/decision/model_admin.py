"""The model registry's admin API: list the versions and what serves, promote, roll back, set
or clear the challenger. A change is committed to the store, applied on this replica at once,
and picked up by every other replica at its next poll (``NBV_MODEL_POLL_S``)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Path, Request, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncSession

from models import registry_store as registry
from models.registry_store import Assignment, ModelVersionInfo, RegistryError
from shared.access.guard import PRINCIPAL, Principal
from shared.runtime import Runtime

log = logging.getLogger(__name__)

Version = Annotated[str, Path(pattern=registry.VERSION_PATTERN, max_length=100)]
Refresh = Callable[[], Awaitable[bool]]


class ModelList(BaseModel):
    assignment: Assignment = Field(description="what serves now")
    versions: list[ModelVersionInfo] = Field(description="newest first")
    history: list[Assignment] = Field(description="the last assignment changes, newest first")


class Change(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=1000, description="why, for the history")


class Challenger(Change):
    version: str = Field(pattern=registry.VERSION_PATTERN, max_length=100)
    share: float = Field(gt=0.0, lt=1.0, description="share of people routed to it, 0 < s < 1")
    salt: str | None = Field(
        default=None,
        max_length=200,
        description="routing salt; default: the challenger's version (kept on share changes)",
    )


def _http(exc: RegistryError) -> HTTPException:
    code = (
        status.HTTP_404_NOT_FOUND
        if isinstance(exc, registry.UnknownVersion)
        else status.HTTP_409_CONFLICT
    )
    return HTTPException(code, str(exc))


def _who(request: Request) -> str:
    """The history's "who": the API key's name (the access middleware leaves the caller)."""
    principal = request.scope.get(PRINCIPAL)
    return f"api key {principal.name}" if isinstance(principal, Principal) else "admin api"


OptionalChange = Annotated[Change | None, Body()]


def model_admin_router(rt: Runtime, refresh: Refresh) -> APIRouter:
    router = APIRouter(prefix="/v1/admin/models", tags=["admin"])

    async def change(work: Callable[[AsyncSession], Awaitable[Assignment]]) -> Assignment:
        """Commit the change, then apply it here at once (other replicas: at their poll)."""
        try:
            async with rt.sessions() as session, session.begin():
                done = await work(session)
        except RegistryError as exc:
            raise _http(exc) from None
        try:
            await refresh()
        except Exception:
            # Committed all the same; the poll retries, the current models keep serving.
            log.exception("assigned model could not be loaded yet")
        return done

    @router.get("")
    async def list_models() -> ModelList:
        """Registered versions with status and headline metrics, and what serves."""
        async with rt.sessions() as session:
            return ModelList(
                assignment=await registry.current_assignment(session),
                versions=await registry.list_versions(session),
                history=await registry.history(session),
            )

    @router.post("/{version}/promote")
    async def promote(
        version: Version, request: Request, body: OptionalChange = None
    ) -> Assignment:
        """Make a registered version the champion."""
        reason = (body or Change()).reason
        return await change(lambda s: registry.promote(s, version, by=_who(request), reason=reason))

    @router.post("/rollback")
    async def rollback(request: Request, body: OptionalChange = None) -> Assignment:
        """Back to the previous champion (the rule prior if there was none)."""
        reason = (body or Change()).reason
        return await change(lambda s: registry.rollback(s, by=_who(request), reason=reason))

    @router.put("/challenger")
    async def set_challenger(body: Challenger, request: Request) -> Assignment:
        """Route a stable share of people (by user id) to another version."""
        return await change(
            lambda s: registry.set_challenger(
                s, body.version, body.share, by=_who(request), reason=body.reason, salt=body.salt
            )
        )

    @router.delete("/challenger")
    async def clear_challenger(request: Request, body: OptionalChange = None) -> Assignment:
        """Everyone back on the champion."""
        reason = (body or Change()).reason
        return await change(lambda s: registry.clear_challenger(s, by=_who(request), reason=reason))

    return router
