"""Email: Jinja2 templates per element kind (HTML + plain text), tracked links, unsubscribe."""

from __future__ import annotations

import hashlib
import re
from email.message import EmailMessage
from email.utils import formataddr, formatdate
from pathlib import Path
from typing import Any

import aiosmtplib
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from services.delivery.channels.base import Outbound, SendFailed
from services.delivery.links import Click, Links
from shared.envelope import Channel
from shared.settings import Settings

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
_ADDRESS = re.compile(r"[^\s<>@\"',;]+@[^\s<>@\"',;]+")


def redact(text: str) -> str:
    """SMTP replies often quote the recipient; errors go to the ledger and the logs without it."""
    return _ADDRESS.sub("<address>", text)


class EmailRenderer:
    def __init__(self, links: Links, product_name: str) -> None:
        self._links = links
        self._product_name = product_name
        self._env = Environment(
            loader=FileSystemLoader(TEMPLATES),
            autoescape=select_autoescape(["html"]),
            undefined=StrictUndefined,
            keep_trailing_newline=True,
        )

    def render(self, outbound: Outbound) -> tuple[str, str, str]:
        """(subject, plain text, html)."""
        content = outbound.item.content
        links = [
            {
                "label": r.label,
                "type": r.type,
                "url": self._links.tracked(
                    Click(
                        delivery_id=outbound.delivery_id,
                        decision_id=outbound.decision.decision_id,
                        element_id=outbound.item.element_id,
                        user_id=outbound.person.user_id,
                        account_id=outbound.person.account_id,
                        channel=Channel.EMAIL,
                        url=r.url,
                    )
                ),
            }
            for r in content.how
        ]
        context: dict[str, Any] = {
            "content": content,
            "links": links,
            "primary": links[0] if links else None,
            "greeting_name": (outbound.person.name or "there").split()[0],
            "reason": outbound.item.reason,
            "product_name": self._product_name,
            "unsubscribe_url": self._links.unsubscribe(outbound.person.user_id),
        }
        parts = []
        for ext in ("txt", "html"):
            template = self._env.select_template(
                [f"email/{content.kind}.{ext}", f"email/default.{ext}"]
            )
            parts.append(template.render(context))
        return content.title, parts[0], parts[1]


class EmailChannel:
    def __init__(self, settings: Settings, links: Links) -> None:
        self._s = settings
        self._links = links
        self.renderer = EmailRenderer(links, settings.product_name)

    def build(self, outbound: Outbound) -> EmailMessage:
        if not outbound.person.email:
            raise SendFailed("no email address in the person's view", transient=False)
        subject, text, html = self.renderer.render(outbound)
        msg = EmailMessage()
        msg["From"] = self._s.smtp_from
        msg["To"] = formataddr((outbound.person.name or "", outbound.person.email))
        msg["Subject"] = subject
        msg["Date"] = formatdate(outbound.now.timestamp(), usegmt=True)
        # Derived from the ledger key: a resend after a crash carries the same Message-ID, so
        # mail systems that deduplicate on it show it once.
        digest = hashlib.sha256(outbound.delivery_id.encode()).hexdigest()[:32]
        msg["Message-ID"] = f"<{digest}@nbv>"
        unsubscribe = self._links.unsubscribe(outbound.person.user_id)
        msg["List-Unsubscribe"] = f"<{unsubscribe}>"
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        msg["X-NBV-Delivery-Id"] = outbound.delivery_id
        msg.set_content(text)
        msg.add_alternative(html, subtype="html")
        return msg

    async def send(self, outbound: Outbound) -> None:
        message = self.build(outbound)
        s = self._s
        try:
            await aiosmtplib.send(
                message,
                hostname=s.smtp_host,
                port=s.smtp_port,
                username=s.smtp_username,
                password=s.smtp_password.get_secret_value() if s.smtp_password else None,
                start_tls=s.smtp_starttls,
                timeout=s.smtp_timeout_s,
            )
        except aiosmtplib.SMTPResponseException as exc:
            # 4xx is "try again later" in SMTP; 5xx (unknown mailbox, refused) will not change.
            reply = redact(exc.message)
            raise SendFailed(f"SMTP {exc.code}: {reply}", transient=exc.code < 500) from exc
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [e.code for e in exc.recipients]
            transient = all(c < 500 for c in codes)
            raise SendFailed(f"recipient refused ({codes})", transient=transient) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise SendFailed(f"SMTP unavailable: {type(exc).__name__}", transient=True) from exc
