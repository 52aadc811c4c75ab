"""Oversized bodies and batches are refused with 413, before the body is read into memory."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import TEST_ADMIN_KEY, ServiceProcess, auth_headers

LIMIT = 64 * 1024
AUTH = b"Authorization: Bearer %s\r\n" % TEST_ADMIN_KEY.encode()


@pytest.fixture(scope="module")
async def small_limit_app(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[ServiceProcess]:
    tmp: Path = tmp_path_factory.mktemp("limits")
    env = {
        "NBV_BUS": "embedded",
        "NBV_DATA_DIR": str(tmp / "data"),
        "NBV_LOG_LEVEL": "WARNING",
        "NBV_SMTP_PORT": "9",
        "NBV_MAX_BODY_BYTES": str(LIMIT),
    }
    proc = ServiceProcess(["serve", "ingest"], env, tmp, "ingest")
    try:
        await proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _events(n: int, pad: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "id": f"lim-{uuid.uuid4().hex}",
            "source": "limits",
            "type": "product.track",
            "time": datetime.now(UTC).isoformat(),
            "account_id": "acct-lim",
            "user_id": "user-lim",
            "payload": {"event": "x", "properties": {"pad": "p" * pad}},
        }
        for _ in range(n)
    ]


async def _raw(port: int, head: bytes, body_chunks: list[bytes]) -> tuple[int, dict[str, Any]]:
    """Send a request by hand, without ending a chunked body, and read the status and JSON
    body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        for chunk in body_chunks:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head_part, _, body = raw.partition(b"\r\n\r\n")
    status = int(head_part.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head_part.lower():
        size, _, rest = body.partition(b"\r\n")
        body = rest[: int(size, 16)]
    return status, json.loads(body)


async def test_declared_content_length_over_limit_is_413_without_reading_the_body(
    small_limit_app: ServiceProcess,
) -> None:
    """Invariant: a Content-Length over the limit is answered 413 although not one byte of
    the body was sent: the server cannot have buffered it."""
    head = (
        b"POST /v1/events/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + AUTH
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (100 * 1024 * 1024)
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", small_limit_app.port)
    writer.write(head)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 413"), raw[:200]
    assert b"payload_too_large" in raw


async def test_chunked_body_over_limit_is_cut_off_with_413(
    small_limit_app: ServiceProcess,
) -> None:
    """Invariant: a chunked body (no Content-Length) is refused with 413 as soon as it passes
    the limit, with a JSON body that names the limit. The client sends one chunk past the
    limit and then nothing more, never ending the body: only a server that counts while the
    body streams can answer (one that buffered the body first would wait, and time out)."""
    head = (
        b"POST /v1/events/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + AUTH
        + b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunks = [b"[" + b" " * 8191] + [b" " * 8192] * (LIMIT // 8192)
    status, body = await _raw(small_limit_app.port, head, chunks)
    assert status == 413
    assert body["error"] == "payload_too_large"
    assert body["limit_bytes"] == LIMIT


async def test_body_under_limit_is_accepted(small_limit_app: ServiceProcess) -> None:
    """The limit refuses only what is over it: a batch just under it is accepted."""
    events = _events(20, pad=1_000)
    assert len(json.dumps({"events": events})) < LIMIT
    async with httpx.AsyncClient(timeout=10, headers=auth_headers()) as http:
        r = await http.post(f"{small_limit_app.url}/v1/events/batch", json={"events": events})
    assert r.status_code == 202, r.text
    assert r.json()["accepted"] == 20


async def test_batch_over_the_event_limit_is_413_and_says_so(
    small_limit_app: ServiceProcess,
) -> None:
    """Invariant: a batch of more events than allowed is a 413 (a size problem the client
    fixes by splitting), with the field and the limit in the body; one at the limit is not."""
    async with httpx.AsyncClient(timeout=30, headers=auth_headers()) as http:
        # Small events, so the count limit trips before the byte limit would.
        tiny = [{"type": "product.track"}] * 1_001
        r = await http.post(f"{small_limit_app.url}/v1/events/batch", json={"events": tiny})
        assert len(r.request.content) < LIMIT
    assert r.status_code == 413, r.text
    body = r.json()
    assert body["error"] == "validation_error"
    assert any(e["field"] == "events" and e["type"] == "too_long" for e in body["errors"]), body
    assert "1000" in body["message"]
