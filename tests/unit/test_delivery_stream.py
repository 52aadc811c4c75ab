import asyncio
from datetime import UTC, datetime, timedelta

from services.delivery.inbox import InboxCard, Notifier
from services.delivery.stream import _diff, sse
from shared.contracts import ElementContent

T0 = datetime(2026, 11, 23, 9, tzinfo=UTC)


def card(element: str, status: str = "pending", minutes: int = 0) -> InboxCard:
    at = T0 + timedelta(minutes=minutes)
    content = ElementContent(element_id=element, title="t", kind="guide", what="w", why="y", how=[])
    return InboxCard(
        id=f"id-{element}",
        decision_id="d",
        element_id=element,
        rank=1,
        score=1.0,
        status=status,
        reason="",
        content=content,
        created_at=at,
        updated_at=at,
    )


def test_sse_frames_multiline_data() -> None:
    assert sse("card", "a\nb", "7") == "event: card\nid: 7\ndata: a\ndata: b\n\n"


def test_stream_pushes_new_and_changed_cards_once_and_removals() -> None:
    sent: dict[str, tuple[str, str]] = {}
    first = _diff(sent, [card("b", minutes=1), card("a")])
    assert [f.split("\n")[1] for f in first] == ["id: id-a", "id: id-b"]  # oldest first
    assert _diff(sent, [card("b", minutes=1), card("a")]) == []  # nothing changed
    changed = _diff(sent, [card("b", "shown", minutes=1)])
    assert changed[0].startswith("event: card\nid: id-b")
    assert changed[1] == 'event: remove\ndata: {"id": "id-a"}\n\n'


async def test_notifier_wakes_only_that_users_streams() -> None:
    notifier = Notifier()
    async with notifier.subscribe("ana") as ana, notifier.subscribe("bo") as bo:
        notifier.notify(["ana", "nobody"])
        await asyncio.wait_for(ana.wait(), 1)
        assert not bo.is_set()
    notifier.notify(["ana"])  # nobody listening any more: no error
