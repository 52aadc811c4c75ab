"""The one place access is enforced: a pure ASGI middleware in front of the router.

It finds the route a request is for, the way the router will (same path patterns, same
order), before anything reads the body, and lets the request on only when the route is public
or the caller passes the route's rule (shared.access.guard). A request for no route goes on
untouched: the router answers it with 404/405 and no handler runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import fastapi.routing
from fastapi import FastAPI
from starlette._utils import get_route_path  # the router's own path logic: same matches
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from shared.access.guard import PRINCIPAL, Guard
from shared.access.scopes import PUBLIC, Rule, rule_of


@dataclass(frozen=True)
class RouteRule:
    path: str
    methods: frozenset[str] | None
    regex: re.Pattern[str]
    rule: Rule

    @property
    def prefix(self) -> str:
        """The literal start of the path, before any parameter."""
        return self.path.split("{", 1)[0]

    def match(self, path: str, method: str) -> Mapping[str, Any] | None:
        found = self.regex.match(path)
        if found is None or (self.methods is not None and method not in self.methods):
            return None
        return found.groupdict()


def _routes(app: FastAPI) -> Iterator[Any]:
    # Newer FastAPI keeps included routers as such and resolves their routes lazily; this
    # walks them with their full paths. Older versions copy the routes into app.routes.
    contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    yield from contexts(app.routes) if contexts is not None else app.routes


def route_rules(app: FastAPI) -> list[RouteRule]:
    """Every route of the app, in routing order, with the rule its handler declared."""
    docs = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    rules: list[RouteRule] = []
    for route in _routes(app):
        path, regex = getattr(route, "path", None), getattr(route, "path_regex", None)
        if not isinstance(path, str) or regex is None:
            # Something the middleware cannot match would be something it cannot guard.
            raise RuntimeError(f"cannot guard route {route!r}: no path pattern")
        methods = getattr(route, "methods", None)
        rule = PUBLIC if path in docs else rule_of(getattr(route, "endpoint", None))
        rules.append(RouteRule(path, frozenset(methods) if methods else None, regex, rule))
    return rules


class AccessMiddleware:
    def __init__(self, app: ASGIApp, *, fastapi_app: FastAPI, guard: Guard) -> None:
        self.app = app
        self._fastapi_app = fastapi_app
        self._guard = guard
        self._rules: list[tuple[str, RouteRule]] | None = None

    def rules(self) -> list[tuple[str, RouteRule]]:
        # Built on first use, so routes added after create_app (a bench's baseline route) are
        # guarded too.
        if self._rules is None:
            self._rules = [(r.prefix, r) for r in route_rules(self._fastapi_app)]
        return self._rules

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = get_route_path(scope)
        method = scope.get("method", "GET")
        for prefix, entry in self.rules():
            # The literal prefix first: a cheap test that skips most regular expressions.
            if path.startswith(prefix) and (params := entry.match(path, method)) is not None:
                break
        else:
            await self.app(scope, receive, send)
            return
        if entry.rule.public:
            await self.app(scope, receive, send)
            return
        outcome = await self._guard.check(scope, f"{method} {entry.path}", entry.rule, params)
        if isinstance(outcome, Response):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            # What the router would have set: metrics and the request log name the route.
            scope["route"] = entry
            await outcome(scope, receive, send)
            return
        scope[PRINCIPAL] = outcome
        await self.app(scope, receive, send)
