"""What a route needs: the scopes, and the declaration a handler carries.

A handler declares how it is reached with ``@requires(Scope.X)`` or ``@public``; a handler
that declares nothing is for administrators only, so a route added without a thought is never
open by accident.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar


class Scope(StrEnum):
    EVENTS_WRITE = "events:write"
    DECISIONS_READ = "decisions:read"
    RESPONSES_WRITE = "responses:write"
    # Implies every other scope.
    ADMIN = "admin"


def grants(held: Iterable[Scope], needed: Scope) -> bool:
    held = set(held)
    return Scope.ADMIN in held or needed in held


@dataclass(frozen=True)
class Rule:
    """How a route may be called. ``scope`` None: by anyone."""

    scope: Scope | None
    # Also HTTP Basic with the key as the user name: how Segment and RudderStack send a write key.
    basic: bool = False
    # Also a publishable widget key, for the user in the path (a handler without the user in its
    # path checks the body itself, see shared.access.guard.caller).
    widget: bool = False
    # The publishable key may come as ``?key=``: a browser's EventSource cannot send headers.
    key_in_query: bool = False

    @property
    def public(self) -> bool:
        return self.scope is None


PUBLIC = Rule(None)
ADMIN_ONLY = Rule(Scope.ADMIN)

_ATTR = "__nbv_access__"
F = TypeVar("F", bound=Callable[..., Any])


def requires(
    scope: Scope, *, basic: bool = False, widget: bool = False, key_in_query: bool = False
) -> Callable[[F], F]:
    """Declare the scope a handler needs (and which other credentials it also takes)."""
    if key_in_query and not widget:
        raise ValueError("only a publishable key may come in the query string")
    rule = Rule(scope, basic=basic, widget=widget, key_in_query=key_in_query)

    def mark(handler: F) -> F:
        setattr(handler, _ATTR, rule)
        return handler

    return mark


def public(handler: F) -> F:
    """Declare a handler open to anyone (health, signed links, webhooks signed otherwise)."""
    setattr(handler, _ATTR, PUBLIC)
    return handler


def rule_of(endpoint: Callable[..., Any] | None) -> Rule:
    """The handler's declaration; none means administrators only."""
    rule = getattr(endpoint, _ATTR, None)
    return rule if isinstance(rule, Rule) else ADMIN_ONLY
