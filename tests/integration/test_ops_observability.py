"""Operations, against a real ``nbv run`` process: one request id follows an event through the
logs of every consumer it reaches; the logs hold no email; /metrics passes ``promtool check
metrics``; and a real Prometheus server scrapes the key series."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.settings import Settings
from tests.factories import event_json
from tests.harness import (
    NBV,
    TEST_ADMIN_KEY,
    ServiceProcess,
    auth_headers,
    eventually,
    free_port,
)

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
HAVE_PROMETHEUS = Path(PROMETHEUS).exists() and Path(PROMTOOL).exists()
EMAIL = "ana.ops-test@example.com"


@pytest.fixture(scope="module")
async def nbv(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServiceProcess]:
    tmp = tmp_path_factory.mktemp("ops")
    env = {
        "NBV_BUS": "embedded",
        "NBV_DATA_DIR": str(tmp / "data"),
        "NBV_EXPLORATION_EPSILON": "0",
        "NBV_CONSUMER_POLL_MS": "50",
        "NBV_CONSUMER_LAG_INTERVAL_S": "0.5",
        "NBV_LOG_LEVEL": "INFO",
    }
    proc = ServiceProcess(["run"], env, tmp, "nbv")
    try:
        await proc.wait_ready()
    except BaseException:
        proc.stop()
        raise
    yield proc
    assert proc.stop(), proc.log_tail()


def _log_lines(proc: ServiceProcess) -> list[dict[str, Any]]:
    lines = []
    for raw in proc.log_path.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            continue  # a line from outside the JSON logger (none expected, but not our subject)
    return lines


def _traced(line: dict[str, Any], trace_id: str) -> bool:
    return bool(line.get("trace_id") == trace_id or trace_id in line.get("trace_ids", []))


async def test_one_request_id_finds_the_events_story_in_the_logs(nbv: ServiceProcess) -> None:
    request_id = f"ops-{uuid.uuid4().hex[:12]}"
    account = f"acct-{request_id}"
    events = [
        event_json("user.identify", {"role": "admin", "email": EMAIL}, account=account),
        # A detractor: the projector turns it into a trigger for the decision consumer.
        event_json("survey.nps", {"score": 2}, account=account),
    ]
    async with httpx.AsyncClient(timeout=15, headers=auth_headers()) as http:
        response = await http.post(
            f"{nbv.url}/v1/events/batch",
            json={"events": events},
            headers={"X-Request-ID": request_id},
        )
    assert response.status_code == 202, response.text
    assert response.headers["x-request-id"] == request_id

    def handled_by(lines: list[dict[str, Any]]) -> set[str]:
        return {
            str(line.get("group", "")).removeprefix("nbv.")
            for line in lines
            if line.get("message") == "records handled" and _traced(line, request_id)
        }

    async def probe() -> list[dict[str, Any]]:
        return _log_lines(nbv)

    lines = await eventually(
        probe,
        lambda ls: {"projector", "decision"} <= handled_by(ls),
        timeout=20,
        what=f"projector and decision log lines with trace id {request_id}",
    )
    accepted = [
        line
        for line in lines
        if line.get("message") == "request" and line.get("route") == "/v1/events/batch"
    ]
    assert any(line.get("trace_id") == request_id for line in accepted), accepted[-3:]
    text = nbv.log_path.read_text(errors="replace")
    assert EMAIL not in text
    assert "@example.com" not in text
    # Every request carried the admin key; no log line holds it, or any part of a key.
    assert TEST_ADMIN_KEY not in text
    assert "nbv_sk_" not in text


def _promtool_check(exposition: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@contextmanager
def _prometheus(tmp_path: Path, target: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real Prometheus server scraping ``target`` every second: the process and its URL."""
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: nbv\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    with (tmp_path / "prometheus.log").open("wb") as log:
        server = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield server, f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@pytest.mark.skipif(
    not HAVE_PROMETHEUS,
    reason="promtool/prometheus not installed (Debian package `prometheus`): "
    "cannot check the exposition or scrape it",
)
async def test_metrics_pass_promtool_and_a_real_prometheus_scrapes_them(
    nbv: ServiceProcess, tmp_path: Path
) -> None:
    async with httpx.AsyncClient(timeout=15, headers=auth_headers()) as http:
        ingested = await http.post(
            f"{nbv.url}/v1/events",
            json=event_json("product.track", {"event": "page_viewed", "feature_area": "core"}),
        )
        assert ingested.status_code == 202, ingested.text
        exposition = (await http.get(f"{nbv.url}/metrics")).text

    for name in (
        "nbv_http_requests_total",
        "nbv_events_ingested_total",
        "nbv_consumer_records_total",
        "nbv_consumer_lag_records",
        "nbv_scheduler_backlog_jobs",
    ):
        assert f"\n{name}" in exposition, f"{name} missing from /metrics"
    checked = _promtool_check(exposition)
    assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr

    with _prometheus(tmp_path, f"127.0.0.1:{nbv.port}") as (server, base_url):
        async with httpx.AsyncClient(base_url=base_url, timeout=5) as api:

            async def query(expr: str) -> list[dict[str, Any]]:
                if server.poll() is not None:
                    raise AssertionError(
                        "Prometheus exited; see prometheus.log in " + str(tmp_path)
                    )
                try:
                    r = await api.get("/api/v1/query", params={"query": expr})
                except httpx.TransportError:
                    return []  # not listening yet
                if r.status_code == 503:
                    return []  # listening, but its storage is still starting
                body = r.json()
                assert body["status"] == "success", body
                result: list[dict[str, Any]] = body["data"]["result"]
                return result

            async def up() -> list[dict[str, Any]]:
                return await query('up{job="nbv"} == 1')

            await eventually(up, bool, timeout=30, what="Prometheus to scrape nbv")
            for expr in (
                'nbv_http_requests_total{route="/v1/events"}',
                "nbv_events_ingested_total",
                'nbv_consumer_records_total{outcome="ok"}',
                "nbv_consumer_lag_records",
                "nbv_event_to_view_seconds_count",
            ):
                series = await query(expr)
                assert series, f"Prometheus has no series for {expr}"
            groups = {s["metric"]["group"] for s in await query("nbv_consumer_lag_records")}
            assert {"nbv.projector", "nbv.decision", "nbv.delivery"} <= groups


async def test_scaled_out_on_kafka_ids_cross_services_and_every_metrics_is_clean(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """Three processes over a real Kafka: the trace id crosses process boundaries only through
    the Kafka headers, and each service's own /metrics passes promtool."""
    env = {
        "NBV_BUS": "kafka",
        "NBV_DATABASE_URL": kafka_settings.database_url,
        "NBV_KAFKA_BOOTSTRAP": kafka_settings.kafka_bootstrap,
        "NBV_TOPIC_PREFIX": kafka_settings.topic_prefix,
        "NBV_DATA_DIR": str(tmp_path / "data"),
        "NBV_EXPLORATION_EPSILON": "0",
        "NBV_CONSUMER_POLL_MS": "50",
        "NBV_CONSUMER_LAG_INTERVAL_S": "0.5",
    }
    migrate = await asyncio.create_subprocess_exec(*NBV, "migrate", env={**os.environ, **env})
    assert await migrate.wait() == 0
    env["NBV_AUTO_MIGRATE"] = "false"
    procs = {
        name: ServiceProcess(["serve", name], env, tmp_path, name)
        for name in ("ingest", "decision", "delivery")
    }
    try:
        await asyncio.gather(*(p.wait_ready() for p in procs.values()))
        request_id = f"kafka-{uuid.uuid4().hex[:12]}"
        account = f"acct-{request_id}"
        async with httpx.AsyncClient(timeout=15, headers=auth_headers()) as http:
            response = await http.post(
                f"{procs['ingest'].url}/v1/events/batch",
                json={"events": [event_json("survey.nps", {"score": 1}, account=account)]},
                headers={"X-Request-ID": request_id},
            )
            assert response.status_code == 202, response.text
            assert response.headers["x-request-id"] == request_id

            def handled(proc: ServiceProcess, group: str) -> bool:
                return any(
                    line.get("message") == "records handled"
                    and line.get("group") == kafka_settings.topic_prefix + group
                    and _traced(line, request_id)
                    for line in _log_lines(proc)
                )

            async def story() -> tuple[bool, bool]:
                return handled(procs["ingest"], "projector"), handled(procs["decision"], "decision")

            await eventually(story, all, timeout=30, what=f"{request_id} in ingest and decision")

            if HAVE_PROMETHEUS:
                for name, proc in procs.items():
                    exposition = (await http.get(f"{proc.url}/metrics")).text
                    assert "nbv_consumer_lag_records{" in exposition, name
                    checked = _promtool_check(exposition)
                    assert checked.returncode == 0 and not checked.stdout.strip(), (
                        name,
                        checked.stdout + checked.stderr,
                    )
    finally:
        clean = {name: p.stop() for name, p in procs.items()}
    assert all(clean.values()), {n: procs[n].log_tail() for n, ok in clean.items() if not ok}
