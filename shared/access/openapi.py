"""The access rules in the OpenAPI schema: the security schemes, and on each operation what
it accepts and the scope it needs (so clients and schemathesis know how to authenticate)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from shared.access.middleware import route_rules
from shared.access.scopes import Rule

SCHEMES: dict[str, dict[str, Any]] = {
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "nbv_sk_…",
        "description": "An API key: `Authorization: Bearer nbv_sk_…`. Each operation names the "
        "scope it needs; `admin` implies every scope. See docs/security.md.",
    },
    "segmentWriteKey": {
        "type": "http",
        "scheme": "basic",
        "description": "Segment/RudderStack style: the API key as the user name, no password.",
    },
    "publishableKey": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "nbv_pk_…",
        "description": "A publishable widget key (POST /v1/widget/keys): only its user's "
        "inbox, live stream, preferences and responses.",
    },
    "publishableKeyQuery": {
        "type": "apiKey",
        "in": "query",
        "name": "key",
        "description": "The publishable key as `?key=`, for EventSource (which sends no headers).",
    },
}

ERROR_SCHEMA = {
    "title": "AccessError",
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string"},
        "message": {"type": "string"},
        "reason": {"type": "string"},
        "retry_after_s": {"type": "integer"},
    },
}


def _security(rule: Rule) -> list[dict[str, list[str]]]:
    if rule.scope is None:
        return []
    options: list[dict[str, list[str]]] = [{"apiKey": [rule.scope.value]}]
    if rule.basic:
        options.append({"segmentWriteKey": [rule.scope.value]})
    if rule.widget:
        options.append({"publishableKey": []})
    if rule.key_in_query:
        options.append({"publishableKeyQuery": []})
    return options


def _responses(rule: Rule) -> dict[str, dict[str, Any]]:
    if rule.scope is None:
        return {}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/AccessError"}}}
    return {
        "401": {"description": "no key, or an unknown, revoked or expired one", "content": error},
        "403": {"description": f"the key lacks the scope {rule.scope.value}", "content": error},
        "429": {"description": "the key's rate limit; see Retry-After", "content": error},
    }


def document(app: FastAPI, schema: dict[str, Any]) -> dict[str, Any]:
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {}).update(SCHEMES)
    components.setdefault("schemas", {})["AccessError"] = ERROR_SCHEMA
    for entry in route_rules(app):
        item = schema.get("paths", {}).get(entry.path)
        if item is None:
            continue
        for method in entry.methods or ():
            operation = item.get(method.lower())
            if operation is None:
                continue
            operation["security"] = _security(entry.rule)
            for status, response in _responses(entry.rule).items():
                operation.setdefault("responses", {}).setdefault(status, response)
    return schema


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` carry the access rules (computed once, like FastAPI's own)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app, generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
