"""Log lines: JSON, carrying the trace context's ids, and free of emails and secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shared import tracing
from shared.bus import Record
from shared.logging import configure_logging, redact, scrub


@pytest.fixture
def logged() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The real configure_logging, its handler's stream swapped for a buffer; undone after.
    Yields a function returning the JSON lines logged so far."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("DEBUG", "test")
    buffer = io.StringIO()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)
    yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("sending to jane.doe+vip@example.co.uk now", "jane.doe+vip@example.co.uk"),
        ("postgresql+asyncpg://nbv:s3cr3t-pw@db:5432/nbv", "s3cr3t-pw"),
        ("smtp://mailer:hunter2@smtp.example.com:587", "hunter2"),
        ("redis://:onlypass@cache:6379/0", "onlypass"),
        ("Authorization: Bearer eyJhbGciOi.payload.sig", "eyJhbGciOi.payload.sig"),
        ("authorization=Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ('{"Authorization": "Bearer abc123def"}', "abc123def"),
        ("GET /unsubscribe?token=tk_live_998&page=2", "tk_live_998"),
        ("api_key=AKIA1234567890", "AKIA1234567890"),
        ("smtp_password: 'p w d'", "p w d"),
        ('{"webhook_secret": "whsec_abc"}', "whsec_abc"),
        ("X-NBV-Signature: sha256=deadbeef", "deadbeef"),
    ],
)
def test_redact_hides_emails_and_secrets(text: str, secret: str) -> None:
    assert secret not in redact(text)


def test_redact_keeps_what_is_not_secret() -> None:
    for text in ("Basic setup guide", "token expired", "page=2", "decision d-1 for u-1"):
        assert redact(text) == text
    assert redact("GET /x?token=abc&page=2") == "GET /x?token=***&page=2"


def test_scrub_walks_nested_values_and_hides_secret_keys() -> None:
    cleaned = scrub(
        {
            "headers": {"Authorization": "Bearer xyz", "Content-Type": "application/json"},
            "smtp_password": "hunter2",
            "to": ["a@example.com", ("b@example.org",)],
            "design": "kept",
            "count": 3,
            "error": ValueError("no route for bob@example.com"),
        }
    )
    assert cleaned["headers"] == {"Authorization": "***", "Content-Type": "application/json"}
    assert cleaned["smtp_password"] == "***"
    assert cleaned["to"] == ["<email>", ["<email>"]]
    assert cleaned["design"] == "kept" and cleaned["count"] == 3
    assert cleaned["error"] == "no route for <email>"


def test_log_lines_are_json_and_never_carry_secrets(
    logged: Callable[[], list[dict[str, Any]]],
) -> None:
    log = logging.getLogger("test.redaction")
    log.info("mailing %s", "ceo@bigcorp.com", extra={"url": "https://u:pw123@h/x"})
    log.warning("webhook", extra={"request_headers": {"authorization": "Bearer tok-1"}})
    try:
        raise RuntimeError("login failed for ops@example.com with password=letmein")
    except RuntimeError:
        log.exception("boom")
    parsed = logged()
    text = json.dumps(parsed)
    for secret in ("ceo@bigcorp.com", "pw123", "tok-1", "ops@example.com", "letmein"):
        assert secret not in text
    assert [p["level"] for p in parsed] == ["INFO", "WARNING", "ERROR"]
    assert parsed[0]["message"] == "mailing <email>" and parsed[0]["service"] == "test"
    assert "RuntimeError" in parsed[2]["exc_info"]


def test_log_lines_carry_the_trace_context(
    logged: Callable[[], list[dict[str, Any]]],
) -> None:
    log = logging.getLogger("test.tracing")
    log.info("outside")
    with tracing.bind(trace_id="t-1", event_id="e-1"), tracing.bind(decision_id="d-1"):
        log.info("inside")
        log.info("explicit", extra={"decision_id": "d-other"})
    batch = [
        Record("t", 0, i, f"k{i}", b"", 0, (("nbv-trace-id", f"t-{i}".encode()),)) for i in range(3)
    ]
    with tracing.use(tracing.for_records(batch)):
        log.info("batch")
    outside, inside, explicit, mixed = logged()
    assert "trace_id" not in outside
    assert (inside["trace_id"], inside["event_id"], inside["decision_id"]) == ("t-1", "e-1", "d-1")
    assert "delivery_id" not in inside
    assert explicit["decision_id"] == "d-other" and explicit["trace_id"] == "t-1"
    assert mixed["trace_ids"] == ["t-0", "t-1", "t-2"] and "trace_id" not in mixed
