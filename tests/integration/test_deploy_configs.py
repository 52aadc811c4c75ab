"""The deployment files: docker-compose.yml, the Dockerfile, Prometheus (config, alert rules and
their unit tests) and Grafana (provisioning and the dashboard).

Static checks always run. ``promtool`` checks run when promtool is on PATH (Debian/Ubuntu:
``apt-get install prometheus``) and ``docker compose config`` when the compose CLI is installed;
otherwise those tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import shared.metrics  # noqa: F401  (registers the nbv_ metrics)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROM_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "nbv.json"

APP_SERVICES = {"ingest": "8001:8000", "decision": "8002:8000", "delivery": "8003:8000"}
ALL_SERVICES = {*APP_SERVICES, "kafka", "postgres", "migrate", "prometheus", "grafana", "mailpit"}

# The metrics the services expose (shared/metrics.py): dashboards and alerts may use only these.
KNOWN_METRICS = {
    family.name + ("_total" if family.type == "counter" else "")
    for family in REGISTRY.collect()
    if family.name.startswith("nbv_")
}
EXPECTED_ALERTS = {
    "ConsumerLagGrowing",
    "DeadLettersAppearing",
    "HighErrorRatio",
    "DecisionLatencyP99High",
    "NoEventsIngested",
    "ServiceDown",
    "SchedulerBacklogHigh",
}
METRIC_RE = re.compile(r"nbv_[a-z_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# ---- helpers -----------------------------------------------------------------------------------


def _load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = _load_yaml(COMPOSE)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose["services"]
    return services


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    return cmd.split() if isinstance(cmd, str) else list(cmd or [])


def _metric_names(expr: str) -> set[str]:
    names = set()
    for name in METRIC_RE.findall(expr):
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                name = name.removesuffix(suffix)
                break
        names.add(name)
    return names


def _dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels nested in collapsed rows
    return panels


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel.get("title", "?"), target["expr"])
        for panel in _dashboard_panels(dashboard)
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def _alert_rules() -> list[dict[str, Any]]:
    rules = _load_yaml(PROM_DIR / "alerts.yml")
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "promtool is not on PATH: install it (Debian/Ubuntu: apt-get install -y prometheus) "
            "to check the Prometheus config and run the alert unit tests"
        )
    return path


def _run(
    cmd: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, (
        f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result


# ---- docker-compose.yml ------------------------------------------------------------------------


def test_compose_has_every_service(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == ALL_SERVICES


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_app_service_runs_one_service_against_kafka_and_postgres(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    service = services[name]
    assert _command(service) == ["serve", name]
    assert service["ports"] == [APP_SERVICES[name]]
    env = _env(service)
    assert env["NBV_BUS"] == "kafka"
    assert env["NBV_AUTO_MIGRATE"] == "false"
    assert env["NBV_HOST"] == "0.0.0.0"
    assert env["NBV_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert env["NBV_DATABASE_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/" in env["NBV_DATABASE_URL"]
    # The bootstrap admin key comes from the environment (.env), never from the file, and
    # compose refuses to start without one.
    assert env["NBV_ADMIN_KEY"].startswith("${NBV_ADMIN_KEY:?")


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_app_service_waits_for_infra_and_migrations(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    depends = services[name]["depends_on"]
    assert isinstance(depends, dict), "depends_on needs the long form, with conditions"
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["kafka"]["condition"] == "service_healthy"
    assert depends["migrate"]["condition"] == "service_completed_successfully"


def test_migrate_is_a_one_shot_after_postgres(services: dict[str, dict[str, Any]]) -> None:
    migrate = services["migrate"]
    assert _command(migrate) == ["migrate"]
    assert migrate.get("restart", "no") == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    env = _env(migrate)
    assert env["NBV_DATABASE_URL"] == _env(services["ingest"])["NBV_DATABASE_URL"]


def test_infra_services_have_healthchecks_and_volumes(
    services: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    for name in ("postgres", "kafka"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert services["postgres"]["image"].startswith("postgres:16")
    assert any("/var/lib/postgresql/data" in v for v in services["postgres"]["volumes"])
    for name in ("postgres", "kafka"):
        for volume in services[name]["volumes"]:
            source = volume.split(":", 1)[0]
            assert source in compose["volumes"], f"{name}: volume {source} is not declared"


def test_kafka_is_a_single_kraft_node(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    assert kafka["image"] == "apache/kafka:4.1.1"
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert env[key] == "1", key
    cluster_id = env["CLUSTER_ID"].rsplit(":-", 1)[-1].rstrip("}")
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{21}", cluster_id), "not a Kafka Uuid"


def test_every_built_service_uses_the_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    built = {name: s["build"] for name, s in services.items() if "build" in s}
    assert set(APP_SERVICES) | {"migrate"} <= set(built)
    images = {services[name]["image"] for name in built}
    assert len(images) == 1, f"services built from the Dockerfile disagree on the image: {images}"
    for name, build in built.items():
        assert isinstance(build, dict), f"{name}: build needs context and dockerfile"
        assert (ROOT / build["context"]).resolve() == ROOT, name
        assert build["dockerfile"] == "deploy/docker/Dockerfile", name
    assert DOCKERFILE.is_file()


def test_observability_services_mount_the_repo_configs(
    services: dict[str, dict[str, Any]],
) -> None:
    prometheus = services["prometheus"]
    assert "9090:9090" in prometheus["ports"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]

    grafana = services["grafana"]
    assert "3000:3000" in grafana["ports"]
    env = _env(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = dict(v.rsplit(":", 2)[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = _load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "nbv.yml")
    assert mounts["./deploy/grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{mounts['./deploy/grafana/dashboards']}/{DASHBOARD.name}"

    mailpit = services["mailpit"]
    assert mailpit["image"].startswith("axllent/mailpit")
    assert {"8025:8025", "1025:1025"} <= set(mailpit["ports"])


COMPOSECHECK = ROOT / "deploy" / "tools" / "composecheck"


def test_docker_compose_config_is_valid() -> None:
    """Validates the file against the Compose spec; needs no Docker engine.

    With the Compose v2 CLI: ``docker compose config -q``. Without it: compose-go, the library
    that CLI loads files with, through deploy/tools/composecheck (Go is on every build machine).
    The legacy v1 ``docker-compose`` is not used: it cannot read the current spec.
    """
    # The one variable the file requires (docs/security.md).
    env = {**os.environ, "NBV_ADMIN_KEY": "nbv_sk_compose-validation-only-not-a-real-key"}
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0:
            _run([docker, "compose", "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, env=env)
            return
    go = shutil.which("go")
    if go is None:
        pytest.skip("neither the Docker Compose v2 CLI nor Go is installed")
    result = subprocess.run(
        [go, "run", ".", str(COMPOSE)],
        cwd=COMPOSECHECK,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout.splitlines()[-1]
    for service in ("kafka", "postgres", "migrate", "ingest", "decision", "delivery"):
        assert f"service {service} " in result.stdout


# ---- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    stages = re.findall(r"^FROM (\S+) AS (\w+)$", text, flags=re.M)
    assert [stage for _, stage in stages] == ["builder", "runtime"]
    for image, _ in stages:
        resolved = args.get(image.strip("${}"), image)
        assert resolved == "python:3.11-slim"
    runtime = text.split("AS runtime", 1)[1]
    assert "libgomp1" in runtime
    assert "COPY --from=builder /opt/venv /opt/venv" in runtime
    user = re.findall(r"^USER (\S+)$", runtime, flags=re.M)
    assert user and not user[-1].startswith(("root", "0")), "the runtime must not run as root"
    assert "NBV_HOST=0.0.0.0" in runtime
    assert "models/registry" in runtime
    assert re.search(r"^EXPOSE 8000$", runtime, flags=re.M)
    healthcheck = re.search(r"^HEALTHCHECK .*?(?<!\\)$", runtime, flags=re.M | re.S)
    assert healthcheck and "urllib" in healthcheck.group(0) and "/healthz" in healthcheck.group(0)
    assert re.search(r'^ENTRYPOINT \["nbv"\]$', runtime, flags=re.M)
    assert re.search(r'^CMD \["run"\]$', runtime, flags=re.M)


def test_dockerfile_copies_only_what_dockerignore_lets_in() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    ignore = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    patterns = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", ".dockerignore should be an allow-list: * first, then !paths"
    for private in (".venv", ".nbv", ".git", "tests"):
        assert private not in allowed
    sources = []
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.M):
        sources += line.split()[:-1]
    assert sources
    for source in sources:
        assert source in allowed, f"COPY {source}: excluded by .dockerignore"
        assert (ROOT / source).exists(), f"COPY {source}: no such path"


# ---- Prometheus --------------------------------------------------------------------------------


def test_prometheus_scrapes_the_three_services() -> None:
    config = _load_yaml(PROM_DIR / "prometheus.yml")
    assert "alerts.yml" in config["rule_files"]
    jobs = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    for name in APP_SERVICES:
        assert jobs[name] == [f"{name}:8000"]


def test_alert_rules_are_complete_and_use_known_metrics() -> None:
    rules = _alert_rules()
    assert {rule["alert"] for rule in rules} == EXPECTED_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
        unknown = _metric_names(rule["expr"]) - KNOWN_METRICS
        assert not unknown, f"{rule['alert']}: unknown metrics {unknown}"


def test_alert_unit_tests_cover_firing_and_quiet_cases() -> None:
    tests = _load_yaml(PROM_DIR / "alerts_test.yml")
    assert tests["rule_files"] == ["alerts.yml"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    for alert in ("ServiceDown", "DeadLettersAppearing", "HighErrorRatio"):
        assert alert in firing, f"no test where {alert} fires"
        assert alert in quiet, f"no test where {alert} stays quiet"


def test_promtool_check_config() -> None:
    _run([_promtool(), "check", "config", "prometheus.yml"], cwd=PROM_DIR)


def test_promtool_check_rules() -> None:
    _run([_promtool(), "check", "rules", "alerts.yml"], cwd=PROM_DIR)


def test_promtool_test_rules() -> None:
    result = _run([_promtool(), "test", "rules", "alerts_test.yml"], cwd=PROM_DIR)
    assert "SUCCESS" in result.stdout


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every dashboard query, as a recording rule, through `promtool check rules`."""
    promtool = _promtool()
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": expr.replace("$__rate_interval", "5m").replace("$__range", "1h"),
        }
        for i, (_, expr) in enumerate(_dashboard_exprs(dashboard))
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _run([promtool, "check", "rules", str(path)], cwd=tmp_path)


# ---- Grafana -----------------------------------------------------------------------------------


def test_grafana_datasource_points_at_prometheus() -> None:
    provisioning = _load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")
    (datasource,) = provisioning["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["isDefault"] is True

    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for panel in _dashboard_panels(dashboard):
        for ref in [
            panel.get("datasource"),
            *(t.get("datasource") for t in panel.get("targets", [])),
        ]:
            if ref is not None:
                assert ref == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]


def test_grafana_dashboard_provider() -> None:
    provisioning = _load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "nbv.yml")
    (provider,) = provisioning["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"]


def test_dashboard_panels_and_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["title"] == "NBV — the loop"
    assert dashboard["uid"]
    panels = _dashboard_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"

    titles = {panel["title"] for panel in panels}
    for wanted in (
        "Events ingested/s by type",
        "Consumer lag by group",
        "Event to view p95",
        "Decisions/s by model version",
        "Decision latency p50 / p99",
        "Exclusions by rule",
        "Deliveries by channel / outcome",
        "Responses by outcome",
        "HTTP 5xx ratio",
        "Dead letters",
    ):
        assert wanted in titles, f"missing panel {wanted!r}"

    for panel in panels:
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel['title']!r} has no query"

    exprs = _dashboard_exprs(dashboard)
    used: set[str] = set()
    for title, expr in exprs:
        names = _metric_names(expr)
        unknown = names - KNOWN_METRICS
        assert not unknown, f"panel {title!r}: unknown metrics {unknown}"
        used |= names
    # Every stage of the loop, access control and the model split are on the dashboard.
    plotted = {
        "nbv_http_requests_total",
        "nbv_events_ingested_total",
        "nbv_consumer_lag_records",
        "nbv_dead_letters_total",
        "nbv_event_to_view_seconds",
        "nbv_decisions_total",
        "nbv_decision_duration_seconds",
        "nbv_exclusions_total",
        "nbv_deliveries_total",
        "nbv_responses_total",
        "nbv_scheduler_backlog_jobs",
        "nbv_auth_failures_total",
        "nbv_rate_limited_total",
        "nbv_model_decisions_total",
        "nbv_model_responses_total",
    }
    assert plotted - used == set()
