"""CSM alerts: a signed JSON (or Slack-compatible) POST to the team's webhook."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import httpx
from pydantic import BaseModel

from services.delivery.channels.base import Outbound, SendFailed
from services.delivery.links import Links
from shared.contracts import Resource
from shared.settings import Settings
from shared.signing import SIGNATURE_HEADER, webhook_signature

# Receivers that are overloaded or rate-limiting say so with these; anything else 4xx is final.
RETRYABLE_STATUS = frozenset({408, 425, 429})
TRIGGER_SLA_HOURS = {"nps_detractor": 24, "payment_failed": 24, "champion_change": 48}


class Who(BaseModel):
    user_id: str
    name: str | None
    role: str | None


class CsmAlert(BaseModel):
    """The body a CSM tool receives: who, which account, what to do, why, and by when."""

    type: str = "nbv.csm_alert"
    delivery_id: str
    decision_id: str
    element_id: str
    who: Who
    account: dict[str, Any]
    title: str
    what: str
    why: str
    how: list[Resource]
    reason: str
    trigger: str | None
    by_when: datetime
    view_url: str


def by_when(outbound: Outbound, default_sla_hours: int) -> datetime:
    hours = TRIGGER_SLA_HOURS.get(outbound.decision.trigger or "", default_sla_hours)
    return outbound.decision.created_at + timedelta(hours=hours)


def build_alert(outbound: Outbound, links: Links, default_sla_hours: int) -> CsmAlert:
    content = outbound.item.content
    person = outbound.person
    return CsmAlert(
        delivery_id=outbound.delivery_id,
        decision_id=outbound.decision.decision_id,
        element_id=outbound.item.element_id,
        who=Who(user_id=person.user_id, name=person.name, role=person.role),
        account=outbound.account,
        title=content.title,
        what=content.what,
        why=content.why,
        how=[r.model_copy(update={"url": links.resource_url(r.url)}) for r in content.how],
        reason=outbound.item.reason,
        trigger=outbound.decision.trigger,
        by_when=by_when(outbound, default_sla_hours),
        view_url=links.view(person.user_id),
    )


def slack_body(alert: CsmAlert) -> dict[str, Any]:
    who = alert.who.name or alert.who.user_id
    role = f" ({alert.who.role.replace('_', ' ')})" if alert.who.role else ""
    account = alert.account.get("account_id", "")
    due = alert.by_when.strftime("%Y-%m-%d %H:%M UTC")
    how = "\n".join(f"• <{r.url}|{r.label}>" for r in alert.how)
    return {
        "text": f"{alert.title}: {who}{role} at {account}, by {due}",
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": alert.title[:150]}},
            {
                "type": "section",
                "fields": [
                    {"type": "mrkdwn", "text": f"*Who*\n{who}{role}"},
                    {"type": "mrkdwn", "text": f"*Account*\n{account}"},
                    {"type": "mrkdwn", "text": f"*By when*\n{due}"},
                    {"type": "mrkdwn", "text": f"*Trigger*\n{alert.trigger or 'n/a'}"},
                ],
            },
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*What*\n{alert.what}"}},
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*Why*\n{alert.why}"}},
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*How*\n{how}"}},
            {
                "type": "context",
                "elements": [
                    {"type": "mrkdwn", "text": f"<{alert.view_url}|Customer view> · {alert.reason}"}
                ],
            },
        ],
    }


class WebhookChannel:
    def __init__(self, settings: Settings, links: Links, client: httpx.AsyncClient) -> None:
        self._s = settings
        self._links = links
        self._client = client
        self._secret = settings.webhook_secret.get_secret_value().encode()

    def body(self, outbound: Outbound) -> bytes:
        alert = build_alert(outbound, self._links, self._s.csm_sla_hours)
        data = (
            slack_body(alert)
            if self._s.csm_webhook_format == "slack"
            else alert.model_dump(mode="json")
        )
        return json.dumps(data, separators=(",", ":")).encode()

    async def send(self, outbound: Outbound) -> None:
        body = self.body(outbound)
        headers = {
            "content-type": "application/json",
            SIGNATURE_HEADER: webhook_signature(self._secret, body),
            # The ledger key: a receiver that stores it drops the rare resend after a crash.
            "X-NBV-Delivery-Id": outbound.delivery_id,
        }
        try:
            response = await self._client.post(
                self._s.csm_webhook_url,
                content=body,
                headers=headers,
                timeout=self._s.webhook_timeout_s,
            )
        except httpx.TimeoutException as exc:
            raise SendFailed("webhook timed out", transient=True) from exc
        except httpx.TransportError as exc:
            raise SendFailed(f"webhook unreachable: {type(exc).__name__}", transient=True) from exc
        code = response.status_code
        if 200 <= code < 300:
            return
        transient = code >= 500 or code in RETRYABLE_STATUS
        raise SendFailed(f"webhook answered {code}", transient=transient)
