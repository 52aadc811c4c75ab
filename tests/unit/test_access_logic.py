"""Access control's logic on its own: keys and their hashes, scopes and route declarations,
the token bucket, publishable widget keys, credential parsing, settings and log redaction."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from services.delivery.links import Click, Links
from shared.access import keys, publishable
from shared.access.guard import AccessDenied, Principal, _credential
from shared.access.ratelimit import RateLimiter, TokenBucket
from shared.access.scopes import ADMIN_ONLY, PUBLIC, Rule, Scope, grants, public, requires, rule_of
from shared.envelope import Channel
from shared.logging import redact
from shared.settings import Settings
from shared.signing import BadToken

SECRET = b"signing-test"
NOW = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)

# ---------------------------------------------------------------- keys


def test_keys_are_random_prefixed_and_stored_as_their_sha256() -> None:
    made = {keys.generate() for _ in range(50)}
    assert len(made) == 50
    for key in made:
        assert key.startswith("nbv_sk_")
        # 32 random bytes, URL-safe base64 without padding.
        assert len(base64.urlsafe_b64decode(key.removeprefix("nbv_sk_") + "=")) == 32
        assert keys.digest(key) == hashlib.sha256(key.encode()).hexdigest()


def test_a_key_needs_a_name_and_a_known_scope() -> None:
    ok = keys.KeyCreate(name="ci ingest", scopes=["events:write", "events:write"])
    assert ok.scopes == [Scope.EVENTS_WRITE, Scope.EVENTS_WRITE] and ok.rate_limit is None
    for bad in (
        {"name": "x", "scopes": []},
        {"name": "x", "scopes": ["root"]},
        {"name": "", "scopes": ["admin"]},
        {"name": "line\nbreak", "scopes": ["admin"]},
        {"name": "x", "scopes": ["admin"], "rate_limit": 0},
        {"name": "x", "scopes": ["admin"], "secret": "mine"},
    ):
        with pytest.raises(ValidationError):
            keys.KeyCreate.model_validate(bad)


def test_listed_keys_never_carry_the_key_or_its_hash() -> None:
    assert {"key", "key_hash"} & set(keys.KeyOut.model_fields) == set()
    assert "key" in keys.KeyCreated.model_fields


# ---------------------------------------------------------------- scopes and declarations


def test_admin_implies_every_scope_and_others_only_themselves() -> None:
    for scope in Scope:
        assert grants({Scope.ADMIN}, scope)
    assert grants({Scope.EVENTS_WRITE}, Scope.EVENTS_WRITE)
    assert not grants({Scope.EVENTS_WRITE}, Scope.DECISIONS_READ)
    assert not grants({Scope.DECISIONS_READ, Scope.RESPONSES_WRITE}, Scope.ADMIN)
    assert not grants(set(), Scope.DECISIONS_READ)


def test_a_handler_without_a_declaration_is_admin_only() -> None:
    async def undeclared() -> None: ...

    @requires(Scope.EVENTS_WRITE, basic=True)
    async def segment() -> None: ...

    @public
    async def health() -> None: ...

    assert rule_of(undeclared) == ADMIN_ONLY
    assert rule_of(None) == ADMIN_ONLY
    assert rule_of(segment) == Rule(Scope.EVENTS_WRITE, basic=True)
    assert rule_of(health) == PUBLIC and PUBLIC.public

    class Handlers:
        @requires(Scope.DECISIONS_READ, widget=True, key_in_query=True)
        async def stream(self) -> None: ...

    # Routes are built from bound methods: the declaration is read through them.
    assert rule_of(Handlers().stream) == Rule(Scope.DECISIONS_READ, widget=True, key_in_query=True)
    with pytest.raises(ValueError, match="publishable"):
        requires(Scope.DECISIONS_READ, key_in_query=True)


def test_principals_act_for_their_own_user_only() -> None:
    secret = Principal("k1", "ci", frozenset({Scope.RESPONSES_WRITE}))
    widget = Principal("widget:ana", "publishable key", user_id="ana")
    assert secret.may_act_for("anyone") and secret.allows(Scope.RESPONSES_WRITE)
    assert not secret.allows(Scope.ADMIN)
    assert widget.may_act_for("ana") and not widget.may_act_for("bob")
    assert not any(widget.allows(s) for s in Scope)


# ---------------------------------------------------------------- rate limits


def test_token_bucket_allows_the_burst_then_says_how_long_to_wait() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)  # one token every 1/rate s
    assert bucket.take(0.25) == pytest.approx(0.25)  # half a token came back meanwhile
    assert bucket.take(0.5) == 0.0
    # Idle long enough, it is full again but never above the burst.
    assert [bucket.take(100.0) for _ in range(4)][:3] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) > 0


def test_rate_limiter_keeps_one_bucket_per_key() -> None:
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert limiter.wait("a", 1.0, 1.0) == 0.0
    assert limiter.wait("a", 1.0, 1.0) == pytest.approx(1.0)
    assert limiter.wait("b", 1.0, 1.0) == 0.0  # another key is not slowed down
    now[0] = 1.0
    assert limiter.wait("a", 1.0, 1.0) == 0.0
    # A key whose limit changed (edited, or another kind of caller) starts a fresh bucket.
    assert limiter.wait("a", 5.0, 10.0) == 0.0


def test_rate_limiter_forgets_idle_keys_beyond_its_bound() -> None:
    limiter = RateLimiter(clock=lambda: 0.0, max_keys=2)
    for key in ("a", "b", "c"):
        assert limiter.wait(key, 1.0, 1.0) == 0.0
    # "a" was evicted (least recently used): it is treated as idle, i.e. full again.
    assert limiter.wait("a", 1.0, 1.0) == 0.0
    assert limiter.wait("c", 1.0, 1.0) > 0


# ---------------------------------------------------------------- publishable keys


def test_publishable_key_round_trips_to_its_user_and_expiry() -> None:
    expires = NOW + timedelta(hours=1)
    key = publishable.mint(SECRET, "ana", expires)
    assert key.startswith("nbv_pk_")
    grant = publishable.read(SECRET, key, NOW)
    assert grant == publishable.WidgetGrant("ana", expires)


def test_publishable_key_refuses_expiry_tampering_and_other_tokens() -> None:
    key = publishable.mint(SECRET, "ana", NOW + timedelta(minutes=5))
    with pytest.raises(publishable.ExpiredKey):
        publishable.read(SECRET, key, NOW + timedelta(minutes=5))
    with pytest.raises(BadToken):
        publishable.read(b"another-secret", key, NOW)
    mac = key.removeprefix("nbv_pk_").partition(".")[2]
    other = publishable.mint(SECRET, "bob", NOW + timedelta(minutes=5))
    forged = "nbv_pk_" + other.removeprefix("nbv_pk_").partition(".")[0] + "." + mac
    with pytest.raises(BadToken):
        publishable.read(SECRET, forged, NOW)
    with pytest.raises(BadToken):
        publishable.read(SECRET, keys.generate(), NOW)
    # An email link signed with the same secret is not a widget key, nor the reverse.
    links = Links(SECRET, "https://nbv.example.com", "")
    unsubscribe = links.unsubscribe("ana").rsplit("/", 1)[1]
    click = Click("d:e:email", "d", "e", "ana", "acme", Channel.EMAIL, "https://x.example")
    tracked = links.tracked(click).rsplit("/", 1)[1]
    for token in (unsubscribe, tracked):
        with pytest.raises(BadToken):
            publishable.read(SECRET, "nbv_pk_" + token, NOW)
    with pytest.raises(BadToken):
        links.read_unsubscribe(key.removeprefix("nbv_pk_"))


def test_widget_key_request_bounds_its_lifetime() -> None:
    assert publishable.WidgetKeyRequest(user_id="ana").ttl_s == 3_600
    for ttl in (0, 59, 86_401):
        with pytest.raises(ValidationError):
            publishable.WidgetKeyRequest(user_id="ana", ttl_s=ttl)
    with pytest.raises(ValidationError):
        publishable.WidgetKeyRequest(user_id="not an id!")


# ---------------------------------------------------------------- credentials


def _scope(headers: dict[str, str], query: str = "") -> dict[str, object]:
    return {
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "query_string": query.encode(),
    }


SEGMENT = Rule(Scope.EVENTS_WRITE, basic=True)
STREAM = Rule(Scope.DECISIONS_READ, widget=True, key_in_query=True)
PLAIN = Rule(Scope.DECISIONS_READ)


def _basic(user: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_credentials_come_from_bearer_basic_where_allowed_or_the_stream_query() -> None:
    assert _credential(_scope({"Authorization": "Bearer nbv_sk_abc"}), PLAIN) == (
        "nbv_sk_abc",
        False,
    )
    assert _credential(_scope({"Authorization": "bearer  nbv_sk_abc "}), PLAIN)[0] == "nbv_sk_abc"  # type: ignore[index]
    assert _credential(_scope({"Authorization": _basic("nbv_sk_w")}), SEGMENT) == (
        "nbv_sk_w",
        False,
    )
    assert _credential(_scope({}, "key=nbv_pk_x&other=1"), STREAM) == ("nbv_pk_x", True)
    # The query string counts only where the route allows it; a header wins over it.
    assert _credential(_scope({}, "key=nbv_pk_x"), PLAIN) is None
    assert _credential(_scope({"Authorization": "Bearer h"}, "key=q"), STREAM) == ("h", False)
    assert _credential(_scope({}), PLAIN) is None


@pytest.mark.parametrize(
    ("header", "rule"),
    [
        (_basic("nbv_sk_w"), PLAIN),  # Basic only on the Segment routes
        ("Basic !!!not-base64", SEGMENT),
        (_basic(""), SEGMENT),
        ("Bearer", PLAIN),
        ("Token nbv_sk_abc", PLAIN),
    ],
)
def test_malformed_authorization_is_a_401_that_says_what_to_send(header: str, rule: Rule) -> None:
    with pytest.raises(AccessDenied) as denied:
        _credential(_scope({"Authorization": header}), rule)
    assert denied.value.status == 401 and denied.value.reason == "malformed"
    assert "Bearer" in denied.value.message
    assert denied.value.headers["WWW-Authenticate"].startswith("Bearer")


# ---------------------------------------------------------------- settings and logs


def test_admin_key_must_be_long_and_cors_origins_read_as_a_list() -> None:
    with pytest.raises(ValidationError, match="32 characters"):
        Settings(admin_key="admin")
    assert Settings(admin_key="").admin_key.get_secret_value() == ""
    assert Settings(cors_origins=" https://a.example/ , https://b.example").cors_origins == [
        "https://a.example",
        "https://b.example",
    ]
    assert Settings(cors_origins='["https://a.example"]').cors_origins == ["https://a.example"]
    assert Settings().cors_origins == []


def test_nbv_keys_are_redacted_wherever_they_appear_in_a_log_line() -> None:
    secret, widget = keys.generate(), publishable.mint(SECRET, "ana", NOW)
    line = redact(f"got {secret} and url /stream?key={widget}&x=1")
    assert secret not in line and widget not in line
    assert "nbv_sk_" not in line and "nbv_pk_" not in line
    assert line.endswith("&x=1")
