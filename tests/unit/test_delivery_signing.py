import random

import pytest

from services.delivery.ledger import backoff_s, delivery_key
from services.delivery.links import Click, Links
from shared.envelope import Channel
from shared.signing import (
    BadToken,
    sign_token,
    verify_token,
    verify_webhook_signature,
    webhook_signature,
)

SECRET = b"s3cret"


def test_tokens_round_trip_and_refuse_tampering() -> None:
    token = sign_token(SECRET, {"k": "click", "u": "https://x.example/a"})
    assert verify_token(SECRET, token)["u"] == "https://x.example/a"
    body, mac = token.split(".")
    forged = sign_token(b"other", {"k": "click", "u": "https://evil.example"}).split(".")[0]
    for bad in (f"{forged}.{mac}", f"{body}.{mac[:-2]}xx", body, "", "a.b.c", token + "x"):
        with pytest.raises(BadToken):
            verify_token(SECRET, bad)
    with pytest.raises(BadToken):
        verify_token(b"wrong", token)


def test_links_resolve_relative_urls_and_keep_kinds_apart() -> None:
    links = Links(SECRET, "https://nbv.example/", "https://app.example")
    click = Click("d:e:email", "d", "e", "ana", "acme", Channel.EMAIL, "/projects/new")
    url = links.tracked(click)
    assert url.startswith("https://nbv.example/v1/t/")
    read = links.read_click(url.rsplit("/", 1)[1])
    assert read.url == "https://app.example/projects/new" and read.user_id == "ana"
    unsub = links.unsubscribe("ana").rsplit("/", 1)[1]
    assert links.read_unsubscribe(unsub) == ("ana", Channel.EMAIL)
    with pytest.raises(BadToken, match="not a click"):
        links.read_click(unsub)  # an unsubscribe token is no redirect


def test_webhook_signature_verifies_and_expires() -> None:
    body = b'{"who":"ana"}'
    header = webhook_signature(SECRET, body, timestamp=1_700_000_000)
    assert header.startswith("t=1700000000,v1=")
    assert verify_webhook_signature(SECRET, body, header, now=1_700_000_100)
    assert not verify_webhook_signature(SECRET, body + b" ", header, now=1_700_000_100)
    assert not verify_webhook_signature(b"other", body, header, now=1_700_000_100)
    assert not verify_webhook_signature(SECRET, body, header, now=1_700_001_000)  # replayed late
    assert not verify_webhook_signature(SECRET, body, "garbage", now=1_700_000_000)


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    rng = random.Random(7)
    for attempt, ceiling in [(1, 2.0), (2, 4.0), (3, 8.0), (10, 60.0)]:
        values = [backoff_s(attempt, 2.0, 60.0, rng) for _ in range(200)]
        assert all(ceiling / 2 <= v <= ceiling for v in values)
        assert len({round(v, 6) for v in values}) > 100  # jittered, not one instant


def test_delivery_key_is_per_decision_element_and_channel() -> None:
    assert delivery_key("d1", "e1", "email") != delivery_key("d1", "e1", "csm")
    assert delivery_key("d1", "e1", "email") == "d1:e1:email"
