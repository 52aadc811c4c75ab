"""The simulator's HTTP side against a scripted API: what it sends for each policy."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from models.simulator.driver import Simulation
from models.simulator.truth import TruthLog, read_truth


class ScriptedApi:
    """Answers like NBV would, with a fixed ranking of in-app cards: an element is offered
    while it is neither achieved nor dismissed nor still open in the person's inbox (a snooze
    closes the card here: the scripted inbox never brings it back)."""

    def __init__(self, items: list[str]) -> None:
        self.items = items
        self.responses: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.decisions = 0
        self.limits: list[int] = []
        # user -> element -> (decision id, status), newest decision last
        self.cards: dict[str, dict[str, tuple[str, str]]] = {}
        self.open_at_decision: list[int] = []
        self.offered: dict[str, list[str]] = {}

    def _open(self, user: str) -> list[tuple[str, str]]:
        mine = self.cards.get(user, {})
        return [
            (d, e) for e, (d, status) in mine.items() if status in ("pending", "shown", "clicked")
        ]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/events/batch":
            self.events.extend(json.loads(request.content)["events"])
            return httpx.Response(202, json={"accepted": 0, "ids": []})
        if path == "/v1/next-best-value":
            self.decisions += 1
            user = request.url.params["user_id"]
            limit = int(request.url.params["limit"])
            self.limits.append(limit)
            self.open_at_decision.append(len(self._open(user)))
            mine = self.cards.setdefault(user, {})
            eligible = [e for e in self.items if e not in mine or mine[e][1] == "snoozed"]
            chosen = eligible[:limit]
            decision = f"d{self.decisions}"
            self.offered[decision] = chosen
            for e in chosen:
                mine[e] = (decision, "pending")
            return httpx.Response(
                200,
                json={
                    "decision_id": decision,
                    "user_id": user,
                    "model_version": "rules-v1",
                    "items": [
                        {"element_id": e, "rank": i + 1, "propensity": 1.0 if i == 0 else 0.0}
                        for i, e in enumerate(chosen)
                    ],
                },
            )
        if path.endswith("/inbox"):
            user = path.split("/")[3]
            items = [{"decision_id": d, "element_id": e} for d, e in reversed(self._open(user))]
            return httpx.Response(200, json={"user_id": user, "items": items})
        if path == "/v1/responses":
            body = json.loads(request.content)
            self.responses.append(body)
            mine = self.cards.get(body["user_id"], {})
            card = mine.get(body["element_id"])
            if card is None or card[0] != body["decision_id"]:
                return httpx.Response(404)
            if card[1] not in ("completed", "dismissed"):
                mine[body["element_id"]] = (card[0], body["outcome"])
            return httpx.Response(202, json={"event_id": "x", "status": "accepted"})
        return httpx.Response(404)


ITEMS = ["product-tour", "create-first-project", "basics-quiz", "use-mentions-comments"]


async def _run(
    policy: str, cards: int = 3, truth: TruthLog | None = None
) -> tuple[ScriptedApi, Simulation]:
    api = ScriptedApi(ITEMS)
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(api), base_url="http://nbv"
    ) as client:
        sim = Simulation(
            client,
            seed=2,
            accounts=3,
            policy=policy,  # type: ignore[arg-type]
            cards=cards,
            truth=truth,
        )
        await sim.setup()
        for _ in range(3):
            await sim.run_week()
    return api, sim


async def test_the_widget_fills_its_free_slots_and_reports_what_people_do() -> None:
    api, sim = await _run("api")
    assert sim.shown
    # NBV is only asked for the slots the open cards leave free.
    assert all(
        0 < limit <= 3 - open_
        for limit, open_ in zip(api.limits, api.open_at_decision, strict=True)
    )
    assert any(limit < 3 for limit in api.limits)
    outcomes = Counter(r["outcome"] for r in api.responses)
    # Each card is reported shown in every session that has it in view (an impression, as
    # widget.js reports one per page view) under NBV's default key, so the label is one; every
    # other response is something the person did, with an id of its own.
    shown = Counter(
        (r["decision_id"], r["element_id"]) for r in api.responses if r["outcome"] == "shown"
    )
    assert shown and max(shown.values()) > 1
    assert all(("id" in r) == (r["outcome"] != "shown") for r in api.responses)
    assert set(outcomes) <= {"shown", "completed", "clicked", "dismissed", "snoozed"}
    assert outcomes["completed"] > 0 and outcomes["dismissed"] > 0
    # The first card of each decision is the top of the ranking among what was offerable, and
    # its reward is whether it was completed (then, or later from the inbox).
    first_completed = {
        (r["decision_id"], r["element_id"]) for r in api.responses if r["outcome"] == "completed"
    }
    for s in sim.shown:
        assert s.propensity == 1.0
        assert s.reward == float((s.decision_id, s.element_id) in first_completed)
    achieved = [e for e in api.events if e["id"].endswith(":achieved")]
    assert len(achieved) == outcomes["completed"]
    tours = [e for e in achieved if e["id"].split(":")[1] == ITEMS[0]]
    assert all(e["payload"]["event"] == "tour_completed" for e in tours)
    # Every event is stamped with the simulation clock's time when it is sent.
    assert all("time" in e for e in api.events)


async def test_random_policy_picks_uniformly_and_snoozes_the_rest() -> None:
    api, sim = await _run("random", cards=1)
    picks = Counter(s.element_id for s in sim.shown)
    assert set(picks) == set(ITEMS)
    for s in sim.shown:
        offered = api.offered[s.decision_id]
        assert abs(s.propensity - 1 / len(offered)) < 1e-12
        # The cards not picked were never seen: put back ("snoozed"), never reported shown.
        unseen = {
            r["element_id"]
            for r in api.responses
            if r["decision_id"] == s.decision_id and r["element_id"] != s.element_id
        }
        assert unseen == set(offered) - {s.element_id}
        assert all(
            r["outcome"] == "snoozed"
            for r in api.responses
            if r["decision_id"] == s.decision_id and r["element_id"] != s.element_id
        )


async def test_same_seed_same_events() -> None:
    a, _ = await _run("api")
    b, _ = await _run("api")
    assert sorted(e["id"] for e in a.events) == sorted(e["id"] for e in b.events)


async def test_the_truth_log_has_every_decision_with_the_hidden_p_of_every_element(
    tmp_path: Path,
) -> None:
    log = TruthLog(tmp_path / "truth.jsonl")
    api, sim = await _run("api", truth=log)
    log.close()
    records = list(read_truth(tmp_path / "truth.jsonl"))
    # One record per decision that offered a card (none for an empty answer).
    offering = {d for d, chosen in api.offered.items() if chosen}
    assert sorted(r.decision_id for r in records) == sorted(offering)
    assert {r.week for r in records} == {0, 1, 2}
    for r in records:
        assert set(r.p_completed) == set(sim.fits)
        assert all(0.0 <= p <= 0.95 for p in r.p_completed.values())
    # The people differ in what would help them: the truth is per person and moment.
    assert len({tuple(sorted(r.p_completed.items())) for r in records}) > 1
