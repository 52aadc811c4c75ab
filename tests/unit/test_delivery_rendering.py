from datetime import UTC, datetime

from services.delivery.channels.base import Outbound, Person
from services.delivery.channels.email import EmailChannel, redact
from services.delivery.channels.webhook import build_alert, slack_body
from services.delivery.links import Links
from services.ingest.view import apply_to_user, new_user
from shared.contracts import DecidedItem, DecisionMessage, ElementContent, Resource
from shared.envelope import Channel
from shared.settings import Settings
from tests.factories import event

LINKS = Links(b"k", "https://nbv.example", "https://app.example")
NOW = datetime(2026, 11, 23, 9, tzinfo=UTC)


def outbound(kind: str, trigger: str | None = None, name: str | None = "Ana Lima") -> Outbound:
    content = ElementContent(
        element_id="e1",
        title="Book your review",
        kind=kind,
        what="Meet <script>x</script> your CSM",
        why="A plan for the renewal",
        how=[Resource(type="calendar", label="Pick a slot", url="/book")],
    )
    item = DecidedItem(
        element_id="e1",
        rank=1,
        channel=Channel.EMAIL,
        score=0.5,
        propensity=0.9,
        reason="renewal in 90 days",
        content=content,
    )
    decision = DecisionMessage(
        decision_id="d1",
        user_id="ana",
        account_id="acme",
        created_at=NOW,
        trigger=trigger,
        model_version="m",
        items=[item],
    )
    person = Person("ana", "acme", "ana@example.com", name, "admin", None)
    return Outbound("d1:e1:email", decision, person, {"account_id": "acme"}, NOW)


def test_email_has_both_parts_kind_template_escaping_and_unsubscribe_headers() -> None:
    channel = EmailChannel(Settings(smtp_from="CS <cs@example.com>"), LINKS)
    msg = channel.build(outbound("human_touch"))
    assert msg["Subject"] == "Book your review" and msg["To"] == "Ana Lima <ana@example.com>"
    assert msg["List-Unsubscribe"].startswith("<https://nbv.example/v1/unsubscribe/")
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["Message-ID"] == channel.build(outbound("human_touch"))["Message-ID"]
    text_part, html_part = msg.get_body(("plain",)), msg.get_body(("html",))
    assert text_part is not None and html_part is not None
    text, html = text_part.get_content(), html_part.get_content()
    assert "Hi Ana," in text and "customer success manager" in text
    assert "&lt;script&gt;" in html and "<script>" not in html
    assert "Pick a time" in html  # the human_touch template's call to action
    # One resource: one tracked link in the text, in the HTML's list and its button.
    assert text.count("https://nbv.example/v1/t/") == 1
    assert html.count("https://nbv.example/v1/t/") == 2
    assert "/book" not in text  # never the raw URL: every link goes through the redirect


def test_unknown_kind_uses_the_default_template() -> None:
    _, text, html = EmailChannel(Settings(), LINKS).renderer.render(outbound("quiz", name=None))
    assert "Hi there," in text and "Pick a slot" in html


def test_csm_alert_says_who_what_why_and_by_when() -> None:
    alert = build_alert(outbound("human_touch", trigger="nps_detractor"), LINKS, 48)
    assert alert.who.user_id == "ana" and alert.who.role == "admin"
    assert (alert.by_when - NOW).total_seconds() == 24 * 3600  # the detractor SLA
    assert alert.view_url == "https://nbv.example/v1/users/ana/view"
    assert alert.how[0].url == "https://app.example/book"
    assert build_alert(outbound("guide"), LINKS, 48).by_when.hour == 9  # default: 48 h
    slack = slack_body(alert)
    assert "Ana Lima" in slack["text"] and slack["blocks"][0]["type"] == "header"


def test_a_snooze_is_not_a_dismissal() -> None:
    user = new_user(event("user.identify", {}))
    payload = {"decision_id": "d1", "element_id": "e1", "outcome": "snoozed"}
    apply_to_user(user, event("nbv.response", payload))
    assert user.dismissed == {} and user.achieved == {}


def test_smtp_errors_are_kept_without_addresses() -> None:
    reply = "5.1.1 <ana.lima+x@example.com>: Recipient address rejected; bo@ex.io too"
    assert redact(reply) == "5.1.1 <<address>>: Recipient address rejected; <address> too"
