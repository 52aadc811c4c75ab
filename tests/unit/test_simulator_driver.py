"""The simulator's HTTP side against a scripted API: what it sends for each policy."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx

from models.simulator.driver import Simulation


class ScriptedApi:
    """Answers like NBV would: a fixed list of eligible in-app cards for everyone."""

    def __init__(self, items: list[str]) -> None:
        self.items = items
        self.responses: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.decisions = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/events/batch":
            self.events.extend(json.loads(request.content)["events"])
            return httpx.Response(202, json={"accepted": 0, "ids": []})
        if request.url.path == "/v1/next-best-value":
            self.decisions += 1
            limit = int(request.url.params["limit"])
            chosen = self.items[:limit]
            return httpx.Response(
                200,
                json={
                    "decision_id": f"d{self.decisions}",
                    "user_id": request.url.params["user_id"],
                    "model_version": "rules-v1",
                    "items": [
                        {"element_id": e, "rank": i + 1, "propensity": 1.0 if i == 0 else 0.0}
                        for i, e in enumerate(chosen)
                    ],
                },
            )
        if request.url.path == "/v1/responses":
            self.responses.append(json.loads(request.content))
            return httpx.Response(202, json={"event_id": "x", "status": "accepted"})
        return httpx.Response(404)


ITEMS = ["product-tour", "create-first-project", "basics-quiz", "use-mentions-comments"]


async def _run(policy: str, cards: int = 3) -> tuple[ScriptedApi, Simulation]:
    api = ScriptedApi(ITEMS)
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(api), base_url="http://nbv"
    ) as client:
        sim = Simulation(client, seed=2, accounts=3, policy=policy, cards=cards)  # type: ignore[arg-type]
        await sim.setup()
        for _ in range(3):
            await sim.run_week()
    return api, sim


async def test_api_policy_shows_the_top_cards_and_reports_every_response() -> None:
    api, sim = await _run("api")
    assert sim.shown and {s.element_id for s in sim.shown} == {ITEMS[0]}
    assert all(s.propensity == 1.0 for s in sim.shown)
    outcomes = Counter(r["outcome"] for r in api.responses)
    # Every card is reported shown, then exactly one follow-up; at most one card is acted on.
    assert outcomes["shown"] == 3 * len(sim.shown)
    follow_ups = sum(outcomes[o] for o in ("completed", "clicked", "dismissed", "snoozed"))
    assert follow_ups == 3 * len(sim.shown)
    acted = Counter(
        r["decision_id"] for r in api.responses if r["outcome"] in ("completed", "clicked")
    )
    assert acted and max(acted.values()) == 1
    first_completed = {
        r["decision_id"]
        for r in api.responses
        if r["outcome"] == "completed" and r["element_id"] == ITEMS[0]
    }
    assert first_completed == {s.decision_id for s in sim.shown if s.reward == 1.0}
    achieved = [e for e in api.events if e["id"].endswith(":achieved")]
    assert len(achieved) == outcomes["completed"]
    tours = [e for e in achieved if e["id"].split(":")[1] == ITEMS[0]]
    assert all(e["payload"]["event"] == "tour_completed" for e in tours)


async def test_random_policy_picks_uniformly_and_snoozes_the_rest() -> None:
    api, sim = await _run("random", cards=1)
    picks = Counter(s.element_id for s in sim.shown)
    assert set(picks) == set(ITEMS)
    assert all(abs(s.propensity - 1 / len(ITEMS)) < 1e-12 for s in sim.shown)
    snoozed_unseen = [
        r
        for r in api.responses
        if r["outcome"] == "snoozed"
        and not any(
            s.decision_id == r["decision_id"] and s.element_id == r["element_id"] for s in sim.shown
        )
    ]
    assert len(snoozed_unseen) == len(sim.shown) * (len(ITEMS) - 1)


async def test_same_seed_same_events() -> None:
    a, _ = await _run("api")
    b, _ = await _run("api")
    assert sorted(e["id"] for e in a.events) == sorted(e["id"] for e in b.events)
