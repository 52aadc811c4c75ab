"""Who is calling, and may they: the checks the access middleware runs for each request.

Keys come from ``Authorization: Bearer <key>`` (or, where a route says so, HTTP Basic with the
key as the user name, or a publishable key in ``?key=``). The bootstrap key (NBV_ADMIN_KEY) is
checked in memory; other secret keys are looked up in the store and cached for
NBV_KEY_CACHE_TTL_S, so a request pays no database round trip and a revocation reaches every
process within that time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from cachetools import TTLCache
from fastapi import Request
from fastapi.responses import JSONResponse

from shared.access import keys, publishable
from shared.access.ratelimit import RateLimiter
from shared.access.scopes import Rule, Scope, grants
from shared.metrics import AUTH_FAILURES, RATE_LIMITED
from shared.runtime import Runtime
from shared.signing import BadToken
from shared.store.models import ApiKey

log = logging.getLogger(__name__)

# Where the middleware leaves the caller for the handler (an ASGI scope extension key).
PRINCIPAL = "nbv.principal"
BOOTSTRAP_ID = "bootstrap"
# A key's last_used_at is written at most this often by one process.
TOUCH_EVERY_S = 60.0
_CHALLENGE = 'Bearer realm="nbv"'


@dataclass(frozen=True)
class Principal:
    """The caller: a secret key (its scopes) or a publishable key (one user, no scopes)."""

    key_id: str
    name: str
    scopes: frozenset[Scope] = frozenset()
    user_id: str | None = None
    # Requests per second; None: not limited.
    rate: float | None = None
    burst: float = 1.0

    def allows(self, scope: Scope) -> bool:
        return grants(self.scopes, scope)

    def may_act_for(self, user_id: str) -> bool:
        return self.user_id is None or self.user_id == user_id


# NBV_ADMIN_KEY's caller: every scope, never rate limited.
BOOTSTRAP = Principal(BOOTSTRAP_ID, "NBV_ADMIN_KEY", frozenset({Scope.ADMIN}))


class AccessDenied(Exception):
    """A 401 or 403, rendered as the project's JSON error; counted by reason."""

    def __init__(
        self, status: int, reason: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        AUTH_FAILURES.labels(self.reason).inc()
        error = "unauthorized" if self.status == 401 else "forbidden"
        return JSONResponse(
            status_code=self.status,
            content={"error": error, "message": self.message, "reason": self.reason},
            headers=self.headers,
        )


def unauthorized(reason: str, message: str, rule: Rule | None = None) -> AccessDenied:
    challenge = _CHALLENGE + (', Basic realm="nbv"' if rule is not None and rule.basic else "")
    return AccessDenied(401, reason, message, {"WWW-Authenticate": challenge})


def forbidden(reason: str, message: str) -> AccessDenied:
    return AccessDenied(403, reason, message)


def rate_limited(retry_after_s: float, rate: float) -> JSONResponse:
    seconds = max(1, math.ceil(retry_after_s))
    return JSONResponse(
        status_code=429,
        content={
            "error": "rate_limited",
            "message": f"this key is limited to {rate:g} requests/s; retry in {seconds} s",
            "retry_after_s": seconds,
        },
        headers={"Retry-After": str(seconds)},
    )


class StoreUnavailable(Exception):
    """The key could not be looked up: the store is down (a 503 the client retries)."""


@dataclass(frozen=True)
class _Key:
    """A stored key as the cache keeps it: the caller it makes, ready for each request."""

    principal: Principal
    revoked: bool


@dataclass
class KeyCache:
    """Secret keys by hash, cached for a few seconds (unknown keys too, so a stream of bad keys
    cannot hammer the store); concurrent misses for one key share one lookup."""

    runtime: Runtime
    ttl_s: float
    # For keys without a rate limit of their own (None: not limited).
    default_rate: float | None
    default_burst: float
    _cache: TTLCache[str, _Key | None] = field(init=False)
    _loading: dict[str, asyncio.Task[_Key | None]] = field(default_factory=dict)
    _touched: dict[str, float] = field(default_factory=dict)
    _writes: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._cache = TTLCache(maxsize=10_000, ttl=self.ttl_s)

    async def get(self, key_hash: str) -> _Key | None:
        try:
            return self._cache[key_hash]
        except KeyError:
            pass
        task = self._loading.get(key_hash)
        if task is None:
            task = asyncio.create_task(self._load(key_hash))
            self._loading[key_hash] = task
            task.add_done_callback(lambda _: self._loading.pop(key_hash, None))
        return await asyncio.shield(task)

    async def _load(self, key_hash: str) -> _Key | None:
        try:
            async with self.runtime.sessions() as session:
                row = await keys.find_key(session, key_hash)
        except Exception as exc:
            log.warning("api key lookup failed", extra={"error": type(exc).__name__})
            raise StoreUnavailable from exc
        # The index found it by equality; compare in constant time all the same.
        found = None
        if row is not None and hmac.compare_digest(row.key_hash, key_hash):
            found = _Key(self._principal(row), revoked=row.revoked_at is not None)
        self._cache[key_hash] = found
        return found

    def _principal(self, row: ApiKey) -> Principal:
        known = {s.value for s in Scope}
        # A scope this version does not know (written by a newer one) grants nothing here.
        scopes = frozenset(Scope(s) for s in row.scopes if s in known)
        if row.rate_limit is not None:
            return Principal(
                row.id, row.name, scopes, rate=row.rate_limit, burst=max(1.0, 2 * row.rate_limit)
            )
        return Principal(row.id, row.name, scopes, rate=self.default_rate, burst=self.default_burst)

    def forget(self, key_hash: str) -> None:
        """Drop a cached key at once (revoked through this process)."""
        self._cache.pop(key_hash, None)

    def used(self, key_id: str) -> None:
        """Note a use; writes last_used_at in the background, at most once a minute."""
        now = time.monotonic()
        if now - self._touched.get(key_id, -math.inf) < TOUCH_EVERY_S:
            return
        self._touched[key_id] = now
        task = asyncio.create_task(self._mark_used(key_id, datetime.now(UTC)))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _mark_used(self, key_id: str, at: datetime) -> None:
        try:
            async with self.runtime.sessions() as session, session.begin():
                await keys.mark_used(session, key_id, at)
        except Exception as exc:
            # Only bookkeeping: the request it came from was served.
            log.warning(
                "could not record a key's use", extra={"key_id": key_id, "error": repr(exc)}
            )

    async def close(self) -> None:
        if self._writes:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*self._writes, return_exceptions=True), timeout=5
                )


class Guard:
    """Authentication, authorization and rate limiting for one process."""

    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        self._runtime = runtime
        self._default_rate = settings.rate_limit_per_s or None
        self._default_burst = settings.rate_limit_burst
        self.keys = KeyCache(
            runtime, settings.key_cache_ttl_s, self._default_rate, self._default_burst
        )
        self.limiter = RateLimiter()
        admin = settings.admin_key.get_secret_value()
        self._bootstrap = keys.digest(admin) if admin else None
        if not admin:
            log.info("NBV_ADMIN_KEY is not set: only keys made by `nbv keys create` open the API")

    async def check(
        self, scope: Mapping[str, Any], route: str, rule: Rule, path_params: Mapping[str, Any]
    ) -> Principal | JSONResponse:
        """The caller of ``route`` (its template), or the response that refuses them: 401,
        403, 429, or 503 when the store cannot say whether a key exists."""
        try:
            principal = await self._authenticate(scope, rule)
            self._authorize(principal, route, rule, path_params)
        except AccessDenied as denied:
            return denied.response()
        except StoreUnavailable:
            return JSONResponse(
                status_code=503,
                content={
                    "error": "store_unavailable",
                    "message": "cannot check the API key now, retry later",
                },
                headers={"Retry-After": "1"},
            )
        if principal.rate is not None:
            wait = self.limiter.wait(principal.key_id, principal.rate, principal.burst)
            if wait > 0:
                # Publishable keys are per person: one label for all, no user ids in metrics.
                RATE_LIMITED.labels("publishable" if principal.user_id else principal.key_id).inc()
                return rate_limited(wait, principal.rate)
        return principal

    # ------------------------------------------------------------------ who

    async def _authenticate(self, scope: Mapping[str, Any], rule: Rule) -> Principal:
        credential = _credential(scope, rule)
        if credential is None:
            raise unauthorized(
                "missing", "an API key is required: send Authorization: Bearer <key>", rule
            )
        key, from_query = credential
        if key.startswith(publishable.PUBLISHABLE_PREFIX):
            return self._widget(key, rule)
        if from_query:
            raise unauthorized(
                "key_in_query",
                "only a publishable key may be sent as ?key=; send a secret key "
                "in the Authorization header",
                rule,
            )
        key_hash = keys.digest(key)
        if self._bootstrap is not None and hmac.compare_digest(key_hash, self._bootstrap):
            return BOOTSTRAP
        found = await self.keys.get(key_hash)
        if found is None:
            raise unauthorized("unknown", "unknown API key", rule)
        principal = found.principal
        if found.revoked:
            log.warning(
                "revoked api key used",
                extra={"key_id": principal.key_id, "key_name": principal.name},
            )
            raise unauthorized("revoked", "this API key has been revoked", rule)
        self.keys.used(principal.key_id)
        return principal

    def _widget(self, key: str, rule: Rule) -> Principal:
        try:
            grant = publishable.read(self._runtime.signing_key, key, datetime.now(UTC))
        except publishable.ExpiredKey:
            raise unauthorized(
                "expired", "this publishable key has expired: mint a new one", rule
            ) from None
        except BadToken:
            raise unauthorized("unknown", "invalid publishable key", rule) from None
        return Principal(
            f"widget:{grant.user_id}",
            "publishable key",
            user_id=grant.user_id,
            rate=self._default_rate,
            burst=self._default_burst,
        )

    # ------------------------------------------------------------------ may they

    @staticmethod
    def _authorize(
        principal: Principal, route: str, rule: Rule, path_params: Mapping[str, Any]
    ) -> None:
        assert rule.scope is not None
        if principal.user_id is not None:
            if not rule.widget:
                raise forbidden(
                    "publishable_key",
                    "a publishable key opens only its user's inbox, live stream, preferences "
                    "and responses",
                )
            path_user = path_params.get("user_id")
            if path_user is not None and path_user != principal.user_id:
                raise forbidden("other_user", "this publishable key is for another user")
            return
        if not principal.allows(rule.scope):
            log.info(
                "api key lacks a scope",
                extra={
                    "key_id": principal.key_id,
                    "key_name": principal.name,
                    "scope": rule.scope.value,
                },
            )
            raise forbidden(
                "scope",
                f"this key lacks the scope {rule.scope.value!r}, which {route} needs",
            )


def _credential(scope: Mapping[str, Any], rule: Rule) -> tuple[str, bool] | None:
    """The key sent, and whether it came in the query string."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            return _from_header(value.decode("latin-1"), rule), False
    if rule.key_in_query:
        for name_, value_ in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
            if name_ == "key" and value_:
                return value_, True
    return None


def _from_header(header: str, rule: Rule) -> str:
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer" and credentials:
        return credentials
    if scheme.lower() == "basic" and rule.basic and credentials:
        try:
            user, _, _password = (
                base64.b64decode(credentials, validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            user = ""
        if user:
            return user
    accepted = "Bearer <key>" + (" or Basic (the key as user name)" if rule.basic else "")
    raise unauthorized("malformed", f"malformed Authorization header: send {accepted}", rule)


def caller(request: Request) -> Principal:
    """The authenticated caller, for a handler that must check its body against it (the
    middleware has already checked the route)."""
    principal = request.scope.get(PRINCIPAL)
    if not isinstance(principal, Principal):
        # Only reachable if the app was built without the access middleware: fail closed.
        raise unauthorized("missing", "an API key is required")
    return principal
