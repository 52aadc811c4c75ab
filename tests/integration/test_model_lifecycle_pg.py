"""The export reads the real PostgreSQL store (JSONB logs, time range, the join)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from models.export import load_log
from services.decision.library import load_library
from shared.store.db import create_engine, migrate, session_factory
from shared.store.models import DecisionRow, Intervention, LibraryVersion

T0 = datetime(2026, 5, 1, 9, tzinfo=UTC)


def _decision(i: int, elements: list[str]) -> DecisionRow:
    return DecisionRow(
        id=f"d{i}",
        user_id=f"u{i % 3}",
        account_id="a1",
        created_at=T0 + timedelta(hours=i),
        channel="in_app",
        trigger=None,
        policy="epsilon-greedy(0.2)",
        model_version="rules-v1",
        context={
            "stage": "onboard",
            "features": {"tenure_days": 3.0, "role_end_user": 1.0, "log_events": 2.0},
            "library_version": 1,
        },
        candidates=[
            {"element_id": e, "excluded_by": None, "p_success": 0.2, "lever": 1.0, "final": 0.1}
            for e in elements
        ]
        + [{"element_id": "configure-sso", "excluded_by": "role"}],
        chosen=[{"element_id": elements[i % len(elements)], "rank": 1, "propensity": 0.6}],
    )


async def test_export_from_postgres(pg_url: str) -> None:
    await migrate(pg_url)
    lib = load_library()
    elements = ["product-tour", "create-first-project", "use-mentions-comments"]
    engine = create_engine(pg_url)
    async with session_factory(engine)() as session, session.begin():
        session.add(
            LibraryVersion(
                version=1,
                source="test",
                element_count=len(lib.elements),
                elements=[e.model_dump(mode="json") for e in lib.elements],
            )
        )
        for i in range(6):
            session.add(_decision(i, elements))
        # d1 completed, d2 clicked then dismissed, d3 never answered (not shown).
        for decision, element, outcomes in (
            ("d1", elements[1], ["shown", "completed"]),
            ("d2", elements[2], ["shown", "clicked", "dismissed"]),
            ("d4", elements[1], ["shown"]),
            ("d5", elements[2], ["shown", "snoozed"]),
        ):
            for o in outcomes:
                session.add(
                    Intervention(
                        event_id=f"{decision}:{element}:{o}",
                        decision_id=decision,
                        user_id="u",
                        account_id="a1",
                        element_id=element,
                        outcome=o,
                        channel="in_app",
                        at=T0,
                    )
                )
    await engine.dispose()

    table = await load_log(pg_url, T0 + timedelta(hours=1), T0 + timedelta(hours=5))
    rows = table.to_pylist()
    assert {r["decision_id"] for r in rows} == {"d1", "d2", "d3", "d4"}  # [since, until)
    assert len(rows) == 4 * len(elements)  # eligible only: the role-excluded one is not there
    shown = {r["decision_id"]: r for r in rows if r["shown"]}
    assert set(shown) == {"d1", "d2", "d4"}
    assert (shown["d1"]["outcome"], shown["d1"]["label"], shown["d1"]["reward"]) == (
        "completed",
        2,
        1.0,
    )
    assert (shown["d2"]["outcome"], shown["d2"]["label"]) == ("clicked", 1)
    assert (shown["d4"]["outcome"], shown["d4"]["label"]) == ("shown", 0)
    assert all(r["propensity"] == 0.6 for r in shown.values())
    assert all(r["tenure_days"] == 3.0 and r["role_end_user"] == 1.0 for r in rows)
    tour = next(r for r in rows if r["element_id"] == "product-tour")
    assert tour["kind_walkthrough"] == 1.0 and tour["stage_match"] == 1.0
