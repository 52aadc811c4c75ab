"""Structured JSON logs with correlation ids. Personal data (emails) and secrets never reach a
log line: every field is scrubbed, including nested extras, exception text and URLs."""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from shared import tracing

_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
# "Authorization: Basic <base64>" — the whole value, before the key=value rule, which would
# otherwise hide only the scheme word and leave the credential after it.
_AUTH_HEADER = re.compile(r"(?i)(authorization[\"']?\s*[=:]\s*[\"']?)([^\"',;\r\n]+)")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=\-]+")
# NBV's own API keys (secret and publishable), wherever they turn up in a line.
_NBV_KEY = re.compile(r"\bnbv_[sp]k_[A-Za-z0-9._\-]+")
_SECRET_WORDS = (
    r"password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|authorization|"
    r"cookie|credential|signature|sig"
)
# The value: a quoted string, or up to the next separator (so "?token=x&page=2" keeps page).
_SECRET = re.compile(
    rf"(?i)\b([\w\-]*?(?:{_SECRET_WORDS}))([\"']?\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|[^\s&,;]+)"
)
_SECRET_URL = re.compile(r"(://[^:/@\s]*:)([^@\s]+)(@)")
# Field names: whole words only ("smtp_password", "X-Signature"; not "design", "assignment").
_SECRET_KEY = re.compile(rf"(?i)(?:^|[_\-.\s])(?:{_SECRET_WORDS})(?:$|[_\-.\s])")
REDACTED = "***"


def log_ref(text: str) -> str:
    """A stable short reference for a value that may name a person (a job key holding a user id,
    say): lines about one thing still correlate, and the value itself stays out of the logs."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def redact(text: str) -> str:
    text = _EMAIL.sub("<email>", text)
    text = _SECRET_URL.sub(rf"\1{REDACTED}\3", text)
    text = _AUTH_HEADER.sub(rf"\1{REDACTED}", text)
    text = _BEARER.sub(rf"\1{REDACTED}", text)
    text = _NBV_KEY.sub(REDACTED, text)
    return _SECRET.sub(rf"\1\2{REDACTED}", text)


def scrub(value: Any, key: str = "") -> Any:
    """``value`` safe to log: values under secret-looking keys hidden, strings redacted, other
    objects turned into redacted text (their ``str`` may hold anything)."""
    if key and _SECRET_KEY.search(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {str(k): scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [scrub(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    return redact(str(value))


class RedactingJsonFormatter(JsonFormatter):
    # Fields the formatter itself fills in: their names contain no secret, but "logger" values
    # like "shared.signing" must not be taken for one.
    _OWN_FIELDS = frozenset({"time", "level", "logger", "service", "message", "exc_info"})

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        return {
            key: scrub(value) if key in self._OWN_FIELDS else scrub(value, key)
            for key, value in log_data.items()
        }


class TraceContextFilter(logging.Filter):
    """Adds the current trace context's ids to every record (explicit ``extra`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = tracing.current()
        if ctx is None:
            return True
        for name, value in ctx.ids().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        if ctx.batch_trace_ids and ctx.trace_id is None and not hasattr(record, "trace_ids"):
            record.trace_ids = list(ctx.batch_trace_ids)
        return True


def configure_logging(level: str = "INFO", service: str = "nbv") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        RedactingJsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"service": service},
        )
    )
    # On the handler, not a logger: records from every library logger pass through it.
    handler.addFilter(TraceContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
