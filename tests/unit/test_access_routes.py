"""Access control over every route of the app (all three services, embedded, in-process): no
route but the listed public ones answers without a key, a route nobody declared is
admin-only, the OpenAPI schema says so, and CORS follows the allow-list."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI

from services.app import build_app
from services.cli import main
from shared.access import keys
from shared.access.middleware import route_rules
from shared.access.scopes import Scope
from shared.http import create_app
from shared.runtime import Runtime
from shared.settings import Settings
from tests.delivery_support import nbv
from tests.harness import TEST_ADMIN_KEY, auth_headers

# The only routes anyone may call without a key. Making a route public means adding it here:
# a decision someone takes on purpose, in review.
PUBLIC = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    ("GET", "/widget.js"),
    ("GET", "/widget/demo"),
    ("GET", "/v1/t/{token}"),
    ("GET", "/v1/unsubscribe/{token}"),
    ("POST", "/v1/unsubscribe/{token}"),
    ("POST", "/v1/webhooks/stripe"),
}


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://nbv") as http:
            yield http


@pytest.fixture
async def app(embedded_settings: Settings) -> AsyncIterator[FastAPI]:
    yield build_app(embedded_settings)


def _operations(app: FastAPI) -> list[tuple[str, str]]:
    return sorted(
        (method, rule.path)
        for rule in route_rules(app)
        for method in rule.methods or {"GET"}
        if method != "HEAD"
    )


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x-1", path)


async def test_every_route_but_the_public_ones_refuses_a_request_without_a_key(
    app: FastAPI,
) -> None:
    operations = _operations(app)
    # The walk sees every operation of the schema (and the routes kept out of it).
    schema = app.openapi()
    documented = {
        (method.upper(), path) for path, item in schema["paths"].items() for method in item
    }
    assert documented <= set(operations)
    assert {op for op in operations if op in PUBLIC} == PUBLIC, "a public route went missing"
    async with running(app) as http:
        for method, path in operations:
            if (method, path) in PUBLIC:
                continue
            # A body too: refused before anyone reads it, so its content cannot matter.
            r = await http.request(method, _concrete(path), content=b"{not json")
            where = f"{method} {path}"
            assert r.status_code == 401, f"{where} answered {r.status_code} without a key"
            assert r.headers["www-authenticate"].startswith("Bearer"), where
            body = r.json()
            assert body["error"] == "unauthorized" and body["reason"] == "missing", where
            # A key nobody issued is refused the same way.
            r = await http.request(method, _concrete(path), headers=auth_headers(keys.generate()))
            assert r.status_code == 401 and r.json()["reason"] == "unknown", where
        # The public ones are open (those that need no body or token to answer 200).
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/widget.js"):
            assert (await http.get(path)).status_code == 200, path


async def test_schema_declares_the_scheme_and_each_operations_scope(app: FastAPI) -> None:
    schema = app.openapi()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["apiKey"] == schemes["apiKey"] | {"type": "http", "scheme": "bearer"}
    assert schemes["segmentWriteKey"]["scheme"] == "basic"
    expected = {
        ("post", "/v1/events"): [{"apiKey": ["events:write"]}],
        ("post", "/v1/track"): [
            {"apiKey": ["events:write"]},
            {"segmentWriteKey": ["events:write"]},
        ],
        ("get", "/v1/next-best-value"): [{"apiKey": ["decisions:read"]}],
        ("get", "/v1/users/{user_id}/inbox/stream"): [
            {"apiKey": ["decisions:read"]},
            {"publishableKey": []},
            {"publishableKeyQuery": []},
        ],
        ("post", "/v1/responses"): [{"apiKey": ["responses:write"]}, {"publishableKey": []}],
        ("get", "/v1/deliveries"): [{"apiKey": ["admin"]}],
        ("post", "/v1/admin/keys"): [{"apiKey": ["admin"]}],
        ("post", "/v1/webhooks/stripe"): [],
        ("get", "/healthz"): [],
    }
    for (method, path), security in expected.items():
        operation = schema["paths"][path][method]
        assert operation["security"] == security, (method, path)
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            assert "security" in operation, f"{method} {path} says nothing about access"
            if operation["security"]:
                assert {"401", "403", "429"} <= set(operation["responses"]), (method, path)


async def test_a_route_added_without_a_declaration_is_admin_only(
    embedded_settings: Settings,
) -> None:
    class Forgetful:
        """A service someone adds later without a thought for access."""

        name = "forgetful"

        def __init__(self, runtime: Runtime) -> None:
            self.router = APIRouter()

            @self.router.get("/v1/forgotten")
            async def forgotten() -> dict[str, str]:
                return {"secret": "stuff"}

        async def start(self) -> None: ...

        async def stop(self) -> None: ...

    rt = Runtime.from_settings(embedded_settings)
    app = create_app(rt, [Forgetful])
    assert app.openapi()["paths"]["/v1/forgotten"]["get"]["security"] == [{"apiKey": ["admin"]}]
    async with running(app) as http:
        assert (await http.get("/v1/forgotten")).status_code == 401
        async with rt.sessions() as session, session.begin():
            reader = await keys.create_key(
                session, keys.KeyCreate(name="reader", scopes=[Scope.DECISIONS_READ])
            )
        refused = await http.get("/v1/forgotten", headers=auth_headers(reader.key))
        assert refused.status_code == 403
        assert "'admin'" in refused.json()["message"]
        assert "GET /v1/forgotten" in refused.json()["message"]
        allowed = await http.get("/v1/forgotten", headers=auth_headers())
        assert allowed.status_code == 200


async def test_segment_routes_take_the_write_key_as_basic_auth_and_no_others(
    app: FastAPI,
) -> None:
    track = {"userId": "u1", "event": "Report Built", "context": {"groupId": "acme"}}
    async with running(app) as http:
        as_basic = await http.post("/v1/track", json=track, auth=(TEST_ADMIN_KEY, ""))
        assert as_basic.status_code == 200, as_basic.text
        other = await http.post(
            "/v1/events",
            json={"source": "app", "type": "product.track", "account_id": "acme"},
            auth=(TEST_ADMIN_KEY, ""),
        )
        assert other.status_code == 401 and other.json()["reason"] == "malformed"
        wrong = await http.post("/v1/track", json=track, auth=(keys.generate(), ""))
        assert wrong.status_code == 401
        assert 'Basic realm="nbv"' in wrong.headers["www-authenticate"]


def _preflight(origin: str) -> dict[str, Any]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }


async def test_cors_allows_listed_origins_only(embedded_settings: Settings) -> None:
    allowed, other = "https://app.example.com", "https://evil.example.net"
    settings = embedded_settings.model_copy(update={"cors_origins": [allowed]})
    async with running(build_app(settings)) as http:
        ok = await http.options("/v1/responses", headers=_preflight(allowed))
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == allowed
        allowed_headers = ok.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed_headers and "content-type" in allowed_headers
        assert "POST" in ok.headers["access-control-allow-methods"]

        refused = await http.options("/v1/responses", headers=_preflight(other))
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers

        # A refusal reaches the allowed page readable (with CORS headers), not as a CORS error.
        denied = await http.get("/v1/users/u1/inbox", headers={"Origin": allowed})
        assert denied.status_code == 401
        assert denied.headers["access-control-allow-origin"] == allowed
        assert (
            "access-control-allow-origin"
            not in (await http.get("/v1/users/u1/inbox", headers={"Origin": other})).headers
        )


async def test_no_cross_origin_calls_by_default(app: FastAPI) -> None:
    async with running(app) as http:
        r = await http.options("/v1/responses", headers=_preflight("https://app.example.com"))
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


async def test_nbv_ingest_over_http_sends_the_configured_key(
    embedded_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "backfill.ndjson"
    rows = [{"type": "product.track", "account_id": "acme", "user_id": f"u{i}"} for i in range(3)]
    path.write_text("".join(json.dumps(r | {"payload": {"event": "x"}}) + "\n" for r in rows))
    async with nbv(embedded_settings, ["ingest"]) as app:
        monkeypatch.setenv("NBV_API_KEY", TEST_ADMIN_KEY)
        assert await asyncio.to_thread(main, ["ingest", str(path), "--url", app.url]) == 0
        assert "3 event(s) sent" in capsys.readouterr().out
        monkeypatch.setenv("NBV_API_KEY", keys.generate())
        assert await asyncio.to_thread(main, ["ingest", str(path), "--url", app.url]) == 1
        assert "refused (401)" in capsys.readouterr().err
