"""The offer history the ranker sees (times offered, days since the last offer) is computed from
the decision log's contacts, logged with each decision, and rebuilt exactly by the export; on
the embedded store and on the real PostgreSQL + Kafka (marked integration)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from sqlalchemy import select, update

from models.export import load_log
from models.features import INDEX
from models.logdata import LogData
from services.decision.service import DecisionService
from shared.contracts import WITHDRAWN_CARD_STATUS
from shared.http import create_app
from shared.runtime import Runtime
from shared.settings import Settings
from shared.store.models import AccountView, Contact, DecisionRow, InboxItem, UserView
from tests.harness import auth_headers

NOW = datetime.now(UTC)
# Two in-app elements anyone may get, with no cool-down, so the same one can be offered again.
ELEMENTS = [
    {
        "id": element_id,
        "title": element_id.replace("-", " "),
        "what": "Do the thing.",
        "why": "It helps.",
        "how": [{"type": "link", "label": "Open", "url": "/x"}],
        "kind": "guide",
        "roles": [],
        "stage": "engage",
        "channels": ["in_app"],
        "effort_minutes": effort,
        "value_weight": 0.8,
        "cooldown_days": 0,
        "feature_area": "reporting",
    }
    for element_id, effort in (("quick-win", 2), ("long-read", 90))
]


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=pytest.mark.integration)])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    base: Settings = request.getfixturevalue(f"{request.param}_settings")
    store = {"database_url": ""} if request.param == "embedded" else {}
    return base.model_copy(update={**store, "model_dir": tmp_path / "registry"})


@pytest.fixture
async def nbv(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime]]:
    rt = Runtime.from_settings(settings)
    service = DecisionService(rt)
    app: FastAPI = create_app(rt, [lambda _: service])
    async with app.router.lifespan_context(app):
        async with rt.sessions() as session, session.begin():
            session.add_all(
                [
                    AccountView(
                        account_id="acme",
                        first_seen=NOW - timedelta(days=90),
                        last_seen=NOW,
                        updated_at=NOW,
                    ),
                    UserView(
                        user_id="ana",
                        account_id="acme",
                        role="end_user",
                        first_seen=NOW - timedelta(days=60),
                        last_seen=NOW - timedelta(hours=1),
                        event_count=40,
                        feature_usage={"core": 30, "reporting": 10},
                        support_questions={"reporting": 2},
                        updated_at=NOW,
                    ),
                ]
            )
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://nbv", headers=auth_headers()
        ) as http:
            imported = await http.post(
                "/v1/admin/library/import", json={"source": "test", "elements": ELEMENTS}
            )
            assert imported.status_code == 200, imported.text
            yield http, rt


async def test_times_offered_counts_the_contacts_of_earlier_decisions(
    nbv: tuple[httpx.AsyncClient, Runtime],
) -> None:
    http, rt = nbv
    picked: list[str] = []
    for _ in range(3):
        r = await http.get(
            "/v1/next-best-value", params={"user_id": "ana", "limit": 1, "channel": "in_app"}
        )
        assert r.status_code == 200, r.text
        picked.append(r.json()["items"][0]["element_id"])
    assert picked == ["quick-win"] * 3  # the rule prior's favourite, again and again

    async with rt.sessions() as session:
        rows = (await session.scalars(select(DecisionRow).order_by(DecisionRow.created_at))).all()
        contacts = (await session.scalars(select(Contact))).all()
    assert [c.element_id for c in contacts] == ["quick-win"] * 3
    # Each decision saw the offers made before it, and nothing of its own.
    histories = [row.context["offer_history"] for row in rows]
    assert [h.get("quick-win", [0])[0] for h in histories] == [0, 1, 2]
    assert all("long-read" not in h for h in histories)
    assert [row.context["features"]["offers_7d"] for row in rows] == [0.0, 1.0, 2.0]
    assert 0 <= histories[2]["quick-win"][1] < 1 / 24  # offered moments ago, in days
    assert rows[0].context["area_questions"] == {"reporting": 2}

    # The export rebuilds the very columns the ranker was given.
    url = rt.settings.resolved_database_url
    data = LogData.from_table(await load_log(url, NOW - timedelta(days=1), NOW + timedelta(days=1)))
    quick = data.take(data.element_id == "quick-win")
    order = np.argsort(quick.decided_at)
    assert list(quick.features[order, INDEX["times_offered"]]) == [0.0, 1.0, 2.0]
    assert quick.features[order[0], INDEX["days_since_offered"]] == 999.0
    assert quick.features[order[2], INDEX["area_questions"]] == 2.0
    assert quick.features[order[2], INDEX["area_reporting"]] == 1.0
    long_read = data.take(data.element_id == "long-read")
    assert list(long_read.features[:, INDEX["times_offered"]]) == [0.0, 0.0, 0.0]


async def test_a_card_withdrawn_unanswered_holds_its_element_back_for_the_cool_down(
    nbv: tuple[httpx.AsyncClient, Runtime],
) -> None:
    """Impression capping's other half: the withdrawn card is read with the person (the same
    statement as the open ones) and its element waits out NBV_INAPP_WITHDRAWN_COOLDOWN_DAYS."""
    http, rt = nbv
    cooldown = timedelta(days=rt.settings.inapp_withdrawn_cooldown_days)
    async with rt.sessions() as session, session.begin():
        session.add(
            InboxItem(
                id="card-quick-win",
                user_id="ana",
                account_id="acme",
                element_id="quick-win",
                decision_id="d-old",
                rank=1,
                score=0.5,
                content={},
                status=WITHDRAWN_CARD_STATUS,
                impressions=3,
                closed_reason="impression cap: shown 3 times without an answer",
                created_at=NOW - timedelta(days=9),
                updated_at=NOW - cooldown + timedelta(hours=1),
            )
        )

    async def first_card() -> tuple[str, dict[str, Any]]:
        r = await http.get(
            "/v1/next-best-value", params={"user_id": "ana", "limit": 1, "channel": "in_app"}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        explained = (await http.get(f"/v1/decisions/{body['decision_id']}")).json()
        verdicts = {c["element_id"]: c for c in explained["candidates"]}
        return body["items"][0]["element_id"], verdicts["quick-win"]

    # The rule prior's favourite (see above) is held back, with the rule named.
    picked, quick = await first_card()
    assert picked == "long-read" and quick["excluded_by"] == "withdrawn"
    # Once the cool-down is over it is offered again.
    async with rt.sessions() as session, session.begin():
        await session.execute(
            update(InboxItem)
            .where(InboxItem.id == "card-quick-win")
            .values(updated_at=NOW - cooldown - timedelta(hours=1))
        )
    picked, quick = await first_card()
    assert picked == "quick-win" and quick.get("excluded_by") is None
