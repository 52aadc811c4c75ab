"""The HTTP process: one FastAPI app hosting one or more services, with health and metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from asyncpg.exceptions import InterfaceError as DriverInterfaceError
from asyncpg.exceptions import InternalClientError, PostgresError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import tracing
from shared.access import openapi as access_openapi
from shared.access.api import keys_router
from shared.access.guard import AccessDenied, Guard
from shared.access.middleware import AccessMiddleware
from shared.access.scopes import public
from shared.metrics import HTTP_DURATION, HTTP_REQUESTS
from shared.runtime import Runtime, Service
from shared.store.db import migrate, ping
from shared.worker import is_transient

log = logging.getLogger(__name__)

ServiceFactory = Callable[[Runtime], Service]


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware overhead); labels by route template, not raw path."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            method = scope["method"]
            HTTP_REQUESTS.labels(self.service, path, method, str(status)).inc()
            HTTP_DURATION.labels(self.service, path, method).observe(time.perf_counter() - start)


class _BodyTooLarge(Exception):
    """Raised from ``receive`` once a streamed body passes the limit; caught by the middleware."""


def _too_large_response(limit: int) -> JSONResponse:
    return JSONResponse(
        status_code=413,
        content={
            "error": "payload_too_large",
            "message": f"request body exceeds {limit} bytes; split it into smaller requests",
            "limit_bytes": limit,
        },
        headers={"Connection": "close"},
    )


class BodySizeLimitMiddleware:
    """Refuses bodies over ``limit`` bytes with 413 before they are buffered.

    A declared ``Content-Length`` over the limit is refused without reading a byte; a chunked
    (or lying) body is counted as it streams and cut off at the first chunk past the limit, so
    no request can make a handler hold more than ``limit`` bytes of it.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.limit:
                    await _too_large_response(self.limit)(scope, receive, send)
                    return
                break
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                # Whatever the app made of the aborted read (FastAPI turns any error while
                # reading the body into a 400) is replaced by the 413 that explains it.
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _too_large_response(self.limit)(scope, receive, send)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if started:
                raise  # too late for a clean 413; the server closes the connection
            await _too_large_response(self.limit)(scope, receive, send)


# Probes and scrapes: a log line each would drown the requests that matter.
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class TracingMiddleware:
    """Runs each request in a trace context (from ``X-Request-ID`` / ``traceparent``, else new),
    answers with the trace id in ``X-Request-ID``, and logs one line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        ctx = tracing.from_http_headers(headers)
        assert ctx.trace_id is not None
        request_id = ctx.trace_id.encode()
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *(h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"),
                    (b"x-request-id", request_id),
                ]
            await send(message)

        with tracing.use(ctx):
            try:
                await self.app(scope, receive, send_wrapper)
            except Exception:
                # Logged here as well as by the server: only here does the line carry the trace.
                log.exception("unhandled error", extra={"method": scope["method"]})
                raise
            finally:
                if scope["path"] not in _QUIET_PATHS:
                    route = scope.get("route")
                    log.info(
                        "request",
                        extra={
                            "method": scope["method"],
                            # The template, not the raw path: ids in paths may be personal.
                            "route": getattr(route, "path", "unmatched"),
                            "status": status,
                            "duration_ms": round((time.perf_counter() - start) * 1000, 1),
                        },
                    )


def _field_path(loc: Sequence[Any]) -> str:
    parts: list[str] = []
    for item in loc:
        if item in ("body", "query", "path", "header") and not parts:
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "body"


def _batch_too_large(errors: Sequence[Any]) -> bool:
    """A top-level list of the body over its maximum length is a batch that is too large: a
    size problem the client fixes by splitting, not a malformed request."""
    return any(
        e["type"] == "too_long"
        and len(e["loc"]) == 2
        and e["loc"][0] == "body"
        and isinstance(e.get("input"), list)
        for e in errors
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = []
    for e in exc.errors():
        loc = list(e["loc"])
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc.append(str(e.get("ctx", {}).get("discriminator", "type")).strip("'"))
        errors.append({"field": _field_path(loc), "message": e["msg"], "type": e["type"]})
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    return JSONResponse(
        status_code=413 if _batch_too_large(exc.errors()) else 422,
        content={"error": "validation_error", "message": summary, "errors": errors},
    )


async def _access_denied(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AccessDenied)
    return exc.response()


async def _driver_error(request: Request, exc: Exception) -> JSONResponse:
    """Errors that reach us unwrapped by SQLAlchemy: asyncpg's own (e.g. 57P03 "the database
    system is shutting down" on connect) and socket errors. An outage is a 503 the client can
    retry, like the wrapped ones; anything else stays a 500, with a body that says so."""
    if is_transient(exc):
        return await _store_unavailable(request, exc)
    log.error("unhandled driver error", extra={"path": request.url.path, "error": repr(exc)})
    return JSONResponse(
        status_code=500, content={"error": "internal_error", "message": "internal error"}
    )


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.error("store error", extra={"path": request.url.path, "error": type(exc).__name__})
    return JSONResponse(
        status_code=503,
        content={"error": "store_unavailable", "message": "the store is unavailable, retry later"},
        headers={"Retry-After": "1"},
    )


def create_app(runtime: Runtime, factories: Sequence[ServiceFactory]) -> FastAPI:
    services = [factory(runtime) for factory in factories]
    name = "+".join(s.name for s in services) or "nbv"
    guard = Guard(runtime)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if runtime.settings.auto_migrate:
            await migrate(runtime.settings.resolved_database_url)
        await runtime.bus.start()
        for service in services:
            await service.start()
        log.info("started", extra={"services": [s.name for s in services]})
        try:
            yield
        finally:
            # Reverse order: consumers drain and commit before the bus and store close.
            for service in reversed(services):
                try:
                    await service.stop()
                except Exception:
                    log.exception("service stop failed", extra={"service_name": service.name})
            await guard.keys.close()
            await runtime.bus.stop()
            await runtime.engine.dispose()
            log.info("stopped")

    app = FastAPI(
        title=f"NBV {name}",
        version="0.1.0",
        lifespan=lifespan,
        description="Next Best Value: event-driven decisions for B2B SaaS Customer Success.",
    )
    app.state.runtime = runtime
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(AccessDenied, _access_denied)
    app.add_exception_handler(OperationalError, _store_unavailable)
    app.add_exception_handler(InterfaceError, _store_unavailable)
    app.add_exception_handler(PostgresError, _driver_error)
    # asyncpg's own "connection is closed" / "does not exist" / "another operation is in
    # progress": the connection was lost or broken under a statement run on the driver
    # (shared.store.driver), which discarded it; a retry gets another.
    app.add_exception_handler(DriverInterfaceError, _store_unavailable)
    app.add_exception_handler(InternalClientError, _store_unavailable)
    app.add_exception_handler(OSError, _driver_error)
    # Inside the metrics middleware, so refused bodies are counted as 413s.
    app.add_middleware(BodySizeLimitMiddleware, limit=runtime.settings.max_body_bytes)
    # Every route but the public ones needs a key (docs/security.md); before the body is read.
    app.add_middleware(AccessMiddleware, fastapi_app=app, guard=guard)
    # Outside access control: preflights need no key, and refusals carry the CORS headers.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=runtime.settings.cors_origins,
        allow_methods=["GET", "POST", "PUT", "DELETE"],
        allow_headers=["Authorization", "Content-Type"],
        expose_headers=["Retry-After", "X-Request-ID"],
        max_age=600,
    )
    app.add_middleware(MetricsMiddleware, service=name)
    # Added last, so outermost: everything below, error handlers included, runs in the trace.
    app.add_middleware(TracingMiddleware)

    @app.get("/healthz", tags=["ops"])
    @public
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    @public
    async def readyz() -> JSONResponse:
        checks = {
            "store": await ping(runtime.engine),
            "bus": await runtime.bus.ready(),
            "consumers": all(w.alive for w in runtime.workers),
        }
        ok = all(checks.values())
        return JSONResponse(
            status_code=200 if ok else 503,
            content={"status": "ready" if ok else "not_ready", "checks": checks},
        )

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    @public
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    for service in services:
        app.include_router(service.router)
    app.include_router(keys_router(runtime, guard))
    access_openapi.install(app)
    return app
