"""The links NBV puts in front of people: tracked resource links and unsubscribe links.

Both are signed tokens, so the redirect endpoint needs no lookup and cannot be turned into an
open redirect: only URLs NBV itself signed are followed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

from shared.envelope import Channel
from shared.signing import BadToken, sign_token, verify_token

CLICK = "click"
UNSUBSCRIBE = "unsub"


@dataclass(frozen=True)
class Click:
    delivery_id: str
    decision_id: str
    element_id: str
    user_id: str
    account_id: str
    channel: Channel
    url: str


class Links:
    def __init__(self, secret: bytes, public_url: str, product_url: str) -> None:
        self._secret = secret
        self._public = public_url.rstrip("/")
        self._product = product_url

    def resource_url(self, url: str) -> str:
        """Relative resource links point into the customer's product."""
        return urljoin(self._product, url) if self._product else url

    def tracked(self, click: Click) -> str:
        claims: dict[str, Any] = {
            "k": CLICK,
            "id": click.delivery_id,
            "d": click.decision_id,
            "e": click.element_id,
            "us": click.user_id,
            "a": click.account_id,
            "c": click.channel.value,
            "u": self.resource_url(click.url),
        }
        return f"{self._public}/v1/t/{sign_token(self._secret, claims)}"

    def unsubscribe(self, user_id: str, channel: Channel = Channel.EMAIL) -> str:
        token = sign_token(self._secret, {"k": UNSUBSCRIBE, "us": user_id, "c": channel.value})
        return f"{self._public}/v1/unsubscribe/{token}"

    def view(self, user_id: str) -> str:
        return f"{self._public}/v1/users/{user_id}/view"

    def read_click(self, token: str) -> Click:
        claims = self._read(token, CLICK)
        return Click(
            delivery_id=str(claims["id"]),
            decision_id=str(claims["d"]),
            element_id=str(claims["e"]),
            user_id=str(claims["us"]),
            account_id=str(claims["a"]),
            channel=Channel(claims["c"]),
            url=str(claims["u"]),
        )

    def read_unsubscribe(self, token: str) -> tuple[str, Channel]:
        claims = self._read(token, UNSUBSCRIBE)
        return str(claims["us"]), Channel(claims["c"])

    def _read(self, token: str, kind: str) -> dict[str, Any]:
        claims = verify_token(self._secret, token)
        if claims.get("k") != kind:
            raise BadToken(f"not a {kind} token")
        try:
            Channel(claims["c"])
        except (KeyError, ValueError) as exc:
            raise BadToken("malformed token") from exc
        return claims
