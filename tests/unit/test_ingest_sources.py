"""Support, surveys and CRM adapters; the file importer's parsing."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.ingest.adapters import Unmappable, crm, support, surveys
from services.ingest.importer import ImportError_, read_rows, run_import, to_event

NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)


def hook(kind: str, **detail) -> support.SupportWebhook:
    ticket = {
        "id": 35436,
        "priority": "HIGH",
        "status": "OPEN",
        "subject": "Export broken",
        "tags": ["billing", "area:reporting"],
        "organization": {"external_id": "acme"},
        "requester": {"external_id": "u1"},
    }
    ticket.update(detail)
    return support.SupportWebhook.model_validate(
        {
            "id": f"zd-{kind}",
            "type": f"zen:event-type:{kind}",
            "time": NOW.isoformat(),
            "detail": ticket,
        }
    )


def test_zendesk_ticket_lifecycle() -> None:
    opened = support.to_event(hook("ticket.created"), NOW)
    assert opened.type == "support.ticket_opened" and opened.account_id == "acme"
    assert opened.payload.priority == "high" and opened.payload.ticket_id == "35436"
    assert opened.payload.feature_area == "reporting"
    updated = support.to_event(hook("ticket.priority_changed", priority="urgent"), NOW)
    assert updated.type == "support.ticket_updated"
    solved = support.to_event(hook("ticket.status_changed", status="SOLVED"), NOW)
    assert solved.type == "support.ticket_solved"


def test_zendesk_csat_ratings() -> None:
    good = support.to_event(
        hook("ticket.satisfaction_rating_changed", satisfaction_rating={"score": "good"}), NOW
    )
    assert good.type == "survey.csat" and good.payload.score == 5
    with pytest.raises(Unmappable, match="good, bad or 1–5"):
        support.to_event(hook("ticket.csat", satisfaction_rating={"score": "meh"}), NOW)
    with pytest.raises(Unmappable) as err:
        support.to_event(hook("ticket.created", organization={}), NOW)
    assert err.value.field == "detail.organization.external_id"


def test_survey_answers() -> None:
    nps = surveys.to_event(
        surveys.SurveyResponse(id="s1", account_id="acme", user_id="u1", kind="nps", score=4)
    )
    assert nps.type == "survey.nps" and nps.payload.score == 4
    csat = surveys.to_event(surveys.SurveyResponse(account_id="acme", kind="csat", score=5))
    assert csat.type == "survey.csat" and csat.user_id is None
    with pytest.raises(ValidationError, match="CSAT answer is 1–5"):
        surveys.SurveyResponse(account_id="acme", kind="csat", score=9)
    with pytest.raises(ValidationError, match="belongs to a person"):
        surveys.SurveyResponse(account_id="acme", kind="nps", score=9)
    with pytest.raises(ValidationError):
        surveys.SurveyResponse(account_id="acme", user_id="u", kind="nps", score=11)


def test_crm_role_changes() -> None:
    e = crm.to_event(
        crm.ContactChange(id="c1", account_id="acme", user_id="bo", role="champion", change="left")
    )
    assert e.type == "crm.contact_role" and e.payload.change == "left"
    with pytest.raises(ValidationError):
        crm.ContactChange(account_id="acme", user_id="bo", role="ceo")


def test_importer_reads_ndjson_and_csv(tmp_path: Path) -> None:
    ndjson = tmp_path / "events.ndjson"
    ndjson.write_text(
        '{"type": "product.track", "account_id": "acme", "user_id": "u1", '
        '"time": "2026-11-01T10:00:00Z", "payload": {"event": "x"}}\n\n'
        '{"id": "e2", "type": "survey.nps", "account_id": "acme", "user_id": "u1", '
        '"payload": {"score": 3}}\n'
    )
    events = [to_event(r) for r in read_rows(ndjson, "ndjson")]
    assert [e.type for e in events] == ["product.track", "survey.nps"]
    assert events[0].id.startswith("import:") and events[0].source == "import"
    # The derived id is stable, so a re-run sends the same ids.
    assert to_event(next(read_rows(ndjson, "ndjson"))).id == events[0].id

    csv_file = tmp_path / "events.csv"
    csv_file.write_text(
        "id,type,account_id,user_id,time,payload.event,payload.feature_area,payload.properties\n"
        'c1,product.track,acme,u1,2026-11-01T10:00:00Z,report_built,reporting,"{""rows"": 3}"\n'
    )
    (row,) = [to_event(r) for r in read_rows(csv_file, "csv")]
    assert row.payload.properties == {"rows": 3}  # type: ignore[union-attr]


async def test_importer_stops_at_the_first_bad_row_naming_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.ndjson"
    path.write_text(
        '{"type": "survey.nps", "account_id": "a", "user_id": "u", "payload": {"score": 3}}\n'
        '{"type": "survey.nps", "account_id": "a", "user_id": "u", "payload": {"score": 42}}\n'
    )
    sent: list[int] = []

    async def send(events) -> None:
        sent.append(len(events))

    with pytest.raises(ImportError_, match=r"line 2: survey\.nps\.payload\.score"):
        await run_import(path, send, batch_size=1)
    assert sent == [1]


def test_nbv_ingest_command_publishes_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    from services.cli import main
    from shared.bus.embedded import EmbeddedBus

    monkeypatch.setenv("NBV_BUS", "embedded")
    monkeypatch.setenv("NBV_DATA_DIR", str(tmp_path / "data"))
    path = tmp_path / "backfill.ndjson"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "type": "product.track",
                    "account_id": "acme",
                    "user_id": f"u{i}",
                    "payload": {"event": "x"},
                }
            )
            + "\n"
            for i in range(25)
        )
    )
    assert main(["ingest", str(path), "--direct", "--batch", "10"]) == 0
    assert "25 event(s) sent" in capsys.readouterr().out

    async def count() -> int:
        bus = EmbeddedBus(tmp_path / "data" / "bus.sqlite")
        await bus.start()
        try:
            consumer = bus.consumer(["nbv.events"], "check")
            await consumer.start()
            return len(await consumer.fetch(100, 100))
        finally:
            await bus.stop()

    assert asyncio.run(count()) == 25
    bad = tmp_path / "bad.ndjson"
    bad.write_text('{"type": "nope", "account_id": "a"}\n')
    assert main(["ingest", str(bad), "--direct"]) == 1
    assert "line 1" in capsys.readouterr().err
