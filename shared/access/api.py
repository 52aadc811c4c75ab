"""The key admin API: create (the key is in the answer, once), list, revoke."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, status

from shared.access import keys
from shared.access.guard import Guard
from shared.access.scopes import Scope, requires
from shared.runtime import Runtime

KeyId = Annotated[str, Path(min_length=1, max_length=32, pattern=r"^[0-9a-f]+$")]


def keys_router(runtime: Runtime, guard: Guard) -> APIRouter:
    router = APIRouter(prefix="/v1/admin/keys", tags=["access"])

    @router.post("", status_code=status.HTTP_201_CREATED)
    @requires(Scope.ADMIN)
    async def create(spec: keys.KeyCreate) -> keys.KeyCreated:
        """Create a key. The answer holds the key itself, the only time it is ever shown."""
        async with runtime.sessions() as session, session.begin():
            return await keys.create_key(session, spec)

    @router.get("")
    @requires(Scope.ADMIN)
    async def list_(
        include_revoked: Annotated[bool, Query(description="also revoked keys")] = True,
    ) -> list[keys.KeyOut]:
        """Every key, oldest first: names, prefixes, scopes and use; never a key or its hash."""
        async with runtime.sessions() as session:
            return await keys.list_keys(session, include_revoked=include_revoked)

    @router.delete("/{key_id}")
    @requires(Scope.ADMIN)
    async def revoke(key_id: KeyId) -> keys.KeyOut:
        """Revoke a key: refused at once by this process, by the others within
        NBV_KEY_CACHE_TTL_S. Revoking again changes nothing."""
        async with runtime.sessions() as session, session.begin():
            row = await keys.revoke_key(session, key_id)
            if row is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown key id {key_id!r}")
            out = keys.KeyOut.model_validate(row)
            key_hash = row.key_hash
        guard.keys.forget(key_hash)
        return out

    return router
