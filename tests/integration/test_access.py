"""Access control on the real paths: NBV on a real port over PostgreSQL and Kafka, keys made
through the admin API and the ``nbv keys`` command, looked up in PostgreSQL and cached."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from services.cli import main
from shared.access import keys, publishable
from shared.envelope import Channel
from shared.settings import Settings
from shared.store.db import session_factory
from tests.delivery_support import (
    SIGNING_SECRET,
    Running,
    decision,
    delivery_settings,
    nbv,
    publish_decisions,
)
from tests.factories import event_json
from tests.harness import NBV, auth_headers, eventually

pytestmark = pytest.mark.integration

CACHE_TTL_S = 2.0


@pytest.fixture
async def app(kafka_settings: Settings) -> AsyncIterator[Running]:
    settings = delivery_settings(kafka_settings, key_cache_ttl_s=CACHE_TTL_S)
    async with nbv(settings) as running:
        yield running


@pytest.fixture
async def admin(app: Running) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=app.url, timeout=15, headers=auth_headers()) as http:
        yield http


async def _new_key(admin: httpx.AsyncClient, name: str, *scopes: str, **extra: Any) -> Any:
    r = await admin.post("/v1/admin/keys", json={"name": name, "scopes": list(scopes), **extra})
    assert r.status_code == 201, r.text
    return r.json()


async def _cli(database_url: str, *args: str) -> tuple[int, str, str]:
    """``nbv keys …`` in its own process, against the same database (another replica's view)."""
    env = {**os.environ, "NBV_DATABASE_URL": database_url, "NBV_AUTO_MIGRATE": "false"}
    proc = await asyncio.create_subprocess_exec(
        *NBV, "keys", *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _as(key: str) -> dict[str, str]:
    return auth_headers(key)


async def test_key_lifecycle_create_use_list_revoke(app: Running, admin: httpx.AsyncClient) -> None:
    # Key management is admin-only, and shows a key only in the answer that created it.
    assert (await admin.get("/v1/admin/keys", headers={"Authorization": ""})).status_code == 401
    created = await _new_key(admin, "crm sync", "decisions:read")
    secret = created["key"]
    assert secret.startswith("nbv_sk_") and secret.startswith(created["prefix"])
    assert created["scopes"] == ["decisions:read"] and created["revoked_at"] is None
    assert "key_hash" not in created

    async with httpx.AsyncClient(base_url=app.url, timeout=15) as http:
        # Authorized (a 404 from the handler), then again from the cache.
        for _ in range(2):
            r = await http.get("/v1/users/nobody/view", headers=_as(secret))
            assert r.status_code == 404, r.text
        listed = await admin.get("/v1/admin/keys")
        assert listed.status_code == 200
        assert secret not in listed.text and keys.digest(secret) not in listed.text
        mine = next(k for k in listed.json() if k["id"] == created["id"])
        assert set(mine) == set(created) - {"key"}

        # The use is recorded (off the request path).
        async def last_used() -> str | None:
            rows: list[dict[str, Any]] = (await admin.get("/v1/admin/keys")).json()
            found: str | None = next(r["last_used_at"] for r in rows if r["id"] == created["id"])
            return found

        await eventually(last_used, bool, what="last_used_at")

        # Revoked through this process: refused at once.
        revoked = await admin.delete(f"/v1/admin/keys/{created['id']}")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"]
        refused = await http.get("/v1/users/nobody/view", headers=_as(secret))
        assert refused.status_code == 401, refused.text
        assert refused.json() == {
            "error": "unauthorized",
            "message": "this API key has been revoked",
            "reason": "revoked",
        }
        assert refused.headers["www-authenticate"].startswith("Bearer")
        again = await admin.delete(f"/v1/admin/keys/{created['id']}")
        assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
        assert (await admin.delete("/v1/admin/keys/0123456789abcdef")).status_code == 404
        active = (await admin.get("/v1/admin/keys", params={"include_revoked": "false"})).json()
        assert created["id"] not in {k["id"] for k in active}


async def test_cli_keys_and_revocation_by_another_process_within_the_cache_ttl(
    app: Running, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = app.settings.database_url
    # The real command in its own process: the key alone on stdout, for scripts to capture.
    code, out, err = await _cli(url, "create", "--name", "backfill", "--scope", "events:write")
    assert code == 0, err
    secret = out.strip()
    assert secret.startswith("nbv_sk_") and "\n" not in secret and "shown only this once" in err

    # The other actions in this process (a process start costs seconds here), same entry point.
    monkeypatch.setenv("NBV_DATABASE_URL", url)
    monkeypatch.setenv("NBV_AUTO_MIGRATE", "false")

    async def nbv_keys(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["keys", *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, out, _ = await nbv_keys("list")
    [row] = [
        json.loads(line) for line in out.splitlines() if json.loads(line)["name"] == "backfill"
    ]
    assert code == 0 and secret not in out and row["scopes"] == ["events:write"]
    code, out, err = await nbv_keys("create", "--name", "x\ny", "--scope", "admin")
    assert (code, out) == (2, "") and err.startswith("nbv keys create: name:")
    with pytest.raises(SystemExit):
        await nbv_keys("create", "--name", "x", "--scope", "root")

    event = event_json("product.track", {"event": "login", "feature_area": "core"})
    async with httpx.AsyncClient(base_url=app.url, timeout=15, headers=_as(secret)) as http:
        assert (await http.post("/v1/events", json=event)).status_code == 202
        # Revoked in the store by someone else (here: straight in the database, as the command
        # does from any host). This process keeps its cached answer for at most the TTL...
        engine = create_async_engine(url)
        try:
            async with session_factory(engine)() as session, session.begin():
                assert await keys.revoke_key(session, row["id"]) is not None
        finally:
            await engine.dispose()
        revoked_at = time.monotonic()
        assert (await http.post("/v1/events", json=event)).status_code == 202

        # ...and refuses it once the TTL has passed.
        async def status() -> int:
            return (await http.post("/v1/events", json=event)).status_code

        await eventually(status, lambda s: s == 401, timeout=CACHE_TTL_S + 5, what="401")
        assert time.monotonic() - revoked_at >= CACHE_TTL_S * 0.9
    code, out, _ = await nbv_keys("revoke", row["id"])
    assert code == 0 and row["id"] in out
    code, _, err = await nbv_keys("revoke", "0123456789abcdef")
    assert code == 1 and "unknown" in err
    code, out, _ = await nbv_keys("list", "--active")
    assert row["id"] not in out


# A sample of routes per scope: (method, path, body, the scope it needs).
SAMPLE: list[tuple[str, str, Any, str]] = [
    ("POST", "/v1/events", event_json("product.track", {"event": "x"}), "events:write"),
    (
        "POST",
        "/v1/track",
        {"userId": "u1", "event": "x", "context": {"groupId": "a"}},
        "events:write",
    ),
    ("GET", "/v1/next-best-value?user_id=nobody", None, "decisions:read"),
    ("GET", "/v1/users/nobody/inbox", None, "decisions:read"),
    ("GET", "/v1/accounts/nobody/view", None, "decisions:read"),
    (
        "POST",
        "/v1/responses",
        {"user_id": "nobody", "decision_id": "d", "element_id": "e", "outcome": "shown"},
        "responses:write",
    ),
    ("PUT", "/v1/users/nobody/preferences", {}, "responses:write"),
    ("GET", "/v1/deliveries", None, "admin"),
    ("GET", "/v1/admin/elements", None, "admin"),
    ("GET", "/v1/admin/keys", None, "admin"),
    # Declares no scope at all (erasure): the secure default makes it admin-only.
    ("DELETE", "/v1/users/nobody", None, "admin"),
]


async def test_401_without_a_key_and_403_without_the_scope(
    app: Running, admin: httpx.AsyncClient
) -> None:
    scoped = {
        scope: (await _new_key(admin, f"only {scope}", scope))["key"]
        for scope in ("events:write", "decisions:read", "responses:write")
    }
    scoped["admin"] = (await _new_key(admin, "operator", "admin"))["key"]
    async with httpx.AsyncClient(base_url=app.url, timeout=15) as http:
        for method, path, body, needed in SAMPLE:
            where = f"{method} {path}"
            r = await http.request(method, path, json=body)
            assert r.status_code == 401, (where, r.text)
            for scope, secret in scoped.items():
                r = await http.request(method, path, json=body, headers=_as(secret))
                if scope in (needed, "admin"):
                    assert r.status_code not in (401, 403), (where, scope, r.text)
                else:
                    assert r.status_code == 403, (where, scope, r.text)
                    refusal = r.json()
                    assert refusal["error"] == "forbidden" and refusal["reason"] == "scope"
                    assert f"'{needed}'" in refusal["message"], refusal
        metrics = (await http.get("/metrics")).text
    assert 'nbv_auth_failures_total{reason="scope"}' in metrics
    assert 'nbv_auth_failures_total{reason="missing"}' in metrics


async def test_rate_limit_answers_429_with_retry_after(
    app: Running, admin: httpx.AsyncClient
) -> None:
    slow = await _new_key(admin, "slow", "decisions:read", rate_limit=0.5)  # burst: 1
    async with httpx.AsyncClient(base_url=app.url, timeout=15, headers=_as(slow["key"])) as http:
        first = await http.get("/v1/users/nobody/view")
        assert first.status_code == 404
        limited = await http.get("/v1/users/nobody/view")
        assert limited.status_code == 429, limited.text
        retry_after = int(limited.headers["retry-after"])
        assert 1 <= retry_after <= 2
        assert limited.json()["error"] == "rate_limited"
        assert limited.json()["retry_after_s"] == retry_after
        # Other keys are not slowed down by it; the bootstrap admin key is never limited.
        for _ in range(20):
            assert (await admin.get("/v1/users/nobody/view")).status_code == 404
        await asyncio.sleep(retry_after)
        assert (await http.get("/v1/users/nobody/view")).status_code == 404
        metrics = (await http.get("/metrics")).text
    assert f'nbv_rate_limited_total{{key="{slow["id"]}"}} 1.0' in metrics


async def _sse_first(http: httpx.AsyncClient, url: str, **kw: Any) -> tuple[int, str]:
    async with http.stream("GET", url, **kw) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            return 200, line
    return 200, ""


async def test_publishable_key_opens_only_its_users_inbox_and_responses(
    app: Running, admin: httpx.AsyncClient
) -> None:
    reader = await _new_key(admin, "backend", "decisions:read")
    writer = await _new_key(admin, "writer", "responses:write")
    d = decision("pk-user", Channel.IN_APP, element_id="video-tour")
    await publish_decisions(app.settings, [d])

    async with httpx.AsyncClient(base_url=app.url, timeout=15) as http:
        body = {"user_id": "pk-user", "ttl_s": 300}
        assert (
            await http.post("/v1/widget/keys", json=body, headers=_as(writer["key"]))
        ).status_code == 403
        minted = await http.post("/v1/widget/keys", json=body, headers=_as(reader["key"]))
        assert minted.status_code == 201, minted.text
        grant = minted.json()
        widget = grant["key"]
        assert grant["user_id"] == "pk-user" and widget.startswith("nbv_pk_")
        expires = datetime.fromisoformat(grant["expires_at"])
        assert timedelta(seconds=290) < expires - datetime.now(UTC) <= timedelta(seconds=300)
        as_widget = _as(widget)

        # Its own inbox, preferences and responses.
        async def inbox() -> list[dict[str, Any]]:
            r = await http.get("/v1/users/pk-user/inbox", headers=as_widget)
            assert r.status_code == 200, r.text
            return list(r.json()["items"])

        [card] = await eventually(inbox, bool, what="the card in the inbox")
        assert (await http.get("/v1/users/pk-user/preferences", headers=as_widget)).is_success
        put = await http.put(
            "/v1/users/pk-user/preferences", json={"channels": {}}, headers=as_widget
        )
        assert put.status_code == 200, put.text
        response = {
            "user_id": "pk-user",
            "decision_id": d.decision_id,
            "element_id": card["element_id"],
            "outcome": "clicked",
        }
        assert (
            await http.post("/v1/responses", json=response, headers=as_widget)
        ).status_code == 202
        code, first_line = await _sse_first(
            http, "/v1/users/pk-user/inbox/stream", params={"key": widget}
        )
        assert (code, first_line) == (200, "retry: 2000")

        # Nobody else's, and nothing else.
        def refused(r: httpx.Response, reason: str) -> bool:
            return r.status_code == 403 and r.json()["reason"] == reason

        assert refused(await http.get("/v1/users/other/inbox", headers=as_widget), "other_user")
        assert refused(
            await http.put("/v1/users/other/preferences", json={}, headers=as_widget), "other_user"
        )
        other_response = response | {"user_id": "other"}
        r = await http.post("/v1/responses", json=other_response, headers=as_widget)
        assert refused(r, "other_user")
        code, text = await _sse_first(http, "/v1/users/other/inbox/stream", params={"key": widget})
        assert code == 403 and "another user" in text
        for method, path in [
            ("GET", "/v1/next-best-value?user_id=pk-user"),
            ("GET", "/v1/users/pk-user/view"),
            ("POST", "/v1/widget/keys"),
            ("GET", "/v1/deliveries"),
        ]:
            r = await http.request(method, path, json=body, headers=as_widget)
            assert refused(r, "publishable_key"), (method, path, r.text)

        # The query string carries a publishable key to the stream only.
        r = await http.get("/v1/users/pk-user/inbox", params={"key": widget})
        assert r.status_code == 401 and r.json()["reason"] == "missing"
        code, text = await _sse_first(
            http, "/v1/users/pk-user/inbox/stream", params={"key": reader["key"]}
        )
        assert code == 401 and "key_in_query" in text

        # Expired or altered: 401.
        expired = publishable.mint(
            SIGNING_SECRET.encode(), "pk-user", datetime.now(UTC) - timedelta(seconds=1)
        )
        r = await http.get("/v1/users/pk-user/inbox", headers=_as(expired))
        assert r.status_code == 401 and r.json()["reason"] == "expired"
        altered = widget[:-2] + ("AA" if not widget.endswith("AA") else "BB")
        r = await http.get("/v1/users/pk-user/inbox", headers=_as(altered))
        assert r.status_code == 401 and r.json()["reason"] == "unknown"
