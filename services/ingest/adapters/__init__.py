"""Adapters: each real source's format mapped into the one envelope (shared/envelope.py).

An adapter is pure mapping (no I/O) plus a small router. Input that is well-formed JSON but
cannot be mapped (e.g. no account to attribute it to) raises ``Unmappable`` naming the field,
which the routes answer with the same 422 body as any validation error.
"""

from __future__ import annotations

import hashlib

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from shared.metrics import EVENTS_REJECTED


class Unmappable(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def unprocessable(exc: Unmappable, source: str) -> JSONResponse:
    EVENTS_REJECTED.labels(f"{source}_unmappable").inc()
    return JSONResponse(
        status_code=422,
        content={
            "error": "validation_error",
            "message": str(exc),
            "errors": [{"field": exc.field, "message": exc.message, "type": "unmappable"}],
        },
    )


def content_id(prefix: str, message: BaseModel) -> str:
    """The idempotency key of a message sent without an id: a hash of its content, so the
    source retrying the same body is deduplicated (two identical bodies are one event)."""
    body = message.model_dump_json(exclude={"id"})
    return f"{prefix}:{hashlib.sha256(body.encode()).hexdigest()[:40]}"
