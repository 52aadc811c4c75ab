"""HMAC signatures: tamper-proof link tokens (tracked clicks, unsubscribe), webhook headers and
pseudonyms."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

SIGNATURE_HEADER = "X-NBV-Signature"


class BadToken(ValueError):
    pass


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_token(secret: bytes, claims: dict[str, Any]) -> str:
    """``<claims>.<mac>``, URL-safe; the claims are readable but cannot be changed."""
    body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    mac = hmac.new(secret, body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def verify_token(secret: bytes, token: str) -> dict[str, Any]:
    body, _, mac = token.partition(".")
    if not body or not mac:
        raise BadToken("malformed token")
    expected = hmac.new(secret, body.encode(), hashlib.sha256).digest()
    try:
        given = _unb64(mac)
        claims = json.loads(_unb64(body))
    except (ValueError, json.JSONDecodeError) as exc:
        raise BadToken("malformed token") from exc
    if not hmac.compare_digest(expected, given):
        raise BadToken("bad signature")
    if not isinstance(claims, dict):
        raise BadToken("malformed token")
    return claims


def keyed_digest(secret: bytes, text: str) -> str:
    """Hex HMAC-SHA256 of ``text``: stable for one secret, and neither reversible nor
    recomputable without it (the pseudonyms of erased people, docs/privacy.md)."""
    return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()


def webhook_signature(secret: bytes, body: bytes, timestamp: int | None = None) -> str:
    """``t=<unix>,v1=<hex hmac-sha256 of "<t>.<body>">``: the timestamp is signed too, so a
    receiver can refuse replays older than its tolerance."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify_webhook_signature(
    secret: bytes, body: bytes, header: str, *, tolerance_s: int = 300, now: int | None = None
) -> bool:
    """What a receiver runs (docs/delivery.md has a standalone copy)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        t = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((int(time.time()) if now is None else now) - t) > tolerance_s:
        return False
    expected = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts.get("v1", ""))
