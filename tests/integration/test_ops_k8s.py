"""The Kubernetes manifests (deploy/k8s), checked offline: each resource against the
Kubernetes JSON schemas (kubernetes-validate ships them), the kustomization renders, and the
things a schema cannot see hold together — selectors, probes, ports, settings names,
autoscaling bounds against Kafka partitions, the security context, no real secrets."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SERVICES = ("ingest", "decision", "delivery")
KUBERNETES_VERSION = "1.32.0"

Doc = dict[str, Any]


def _kustomization() -> Doc:
    data: Doc = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return data


def _resources() -> list[Doc]:
    docs: list[Doc] = []
    for name in _kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def _one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    return _resources()


def _config(docs: list[Doc]) -> dict[str, str]:
    data: dict[str, str] = _one(docs, "ConfigMap", "nbv-config")["data"]
    return data


def test_every_manifest_file_is_in_the_kustomization() -> None:
    listed = set(_kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_every_resource_matches_the_kubernetes_schema(docs: list[Doc]) -> None:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (dev dependency) is not installed"
    )
    for doc in docs:
        kv.validate(doc, KUBERNETES_VERSION, strict=True)
    # The check can fail: a misspelt field is refused.
    broken = _one(docs, "Deployment", "nbv-ingest") | {"spec": {"replicas": 1, "selectr": {}}}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_renders_with_namespace_image_and_labels() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render the kustomization")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert rendered.returncode == 0, rendered.stderr
    out = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    assert len(out) == len(_resources())
    image = _kustomization()["images"][0]
    for doc in out:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "nbv"
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "nbv"
        if doc["kind"] in ("Deployment", "Job"):
            for c in doc["spec"]["template"]["spec"]["containers"]:
                assert c["image"] == f"{image['newName']}:{image['newTag']}"


def test_the_namespace_is_the_kustomization_namespace(docs: list[Doc]) -> None:
    assert _one(docs, "Namespace", _kustomization()["namespace"])


def _env_names() -> set[str]:
    return {f"NBV_{name.upper()}" for name in Settings.model_fields}


def test_config_and_secret_keys_are_real_settings(docs: list[Doc]) -> None:
    known = _env_names()
    config = _config(docs)
    secret = _one(docs, "Secret", "nbv-secrets")["stringData"]
    assert set(config) - known == set(), "ConfigMap keys that no setting reads"
    assert set(secret) - known == set(), "Secret keys that no setting reads"
    assert not set(config) & set(secret)
    assert config["NBV_BUS"] == "kafka" and config["NBV_AUTO_MIGRATE"] == "false"
    assert "NBV_DATABASE_URL" in secret and "NBV_DATABASE_URL" not in config
    # Placeholders only: nothing here could be a working credential.
    for key, value in secret.items():
        assert value == "" or "REPLACE_ME" in value, f"{key} holds a value, not a placeholder"


def _workload(docs: list[Doc], kind: str, name: str) -> tuple[Doc, Doc]:
    doc = _one(docs, kind, name)
    return doc, doc["spec"]["template"]["spec"]


def _check_pod_security(pod: Doc, container: Doc, uid: int) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    assert pod["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"] for v in pod.get("volumes", [])}
    assert mounts <= volumes
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}


def _check_env_from(docs: list[Doc], container: Doc) -> None:
    refs = container["envFrom"]
    assert {r["configMapRef"]["name"] for r in refs if "configMapRef" in r} == {"nbv-config"}
    assert {r["secretRef"]["name"] for r in refs if "secretRef" in r} == {"nbv-secrets"}


def _image_uid() -> int:
    match = re.search(r"--uid (\d+)", (ROOT / "deploy/docker/Dockerfile").read_text())
    assert match, "the Dockerfile creates no user with a fixed uid"
    return int(match.group(1))


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_is_deployed_probed_scaled_and_protected(
    docs: list[Doc], service: str
) -> None:
    name = f"nbv-{service}"
    deployment, pod = _workload(docs, "Deployment", name)
    [container] = pod["containers"]
    assert container["image"] == "nbv"
    assert container["args"] == ["serve", service]
    _check_env_from(docs, container)
    _check_pod_security(pod, container, _image_uid())

    port = int(_config(docs)["NBV_PORT"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": port}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ("http", port), probe
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] == "/metrics"

    selector = deployment["spec"]["selector"]["matchLabels"]
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= template_labels.items()
    assert selector["app.kubernetes.io/component"] == service

    svc = _one(docs, "Service", name)
    assert svc["spec"]["selector"] == selector
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]

    hpa = _one(docs, "HorizontalPodAutoscaler", name)
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": name,
    }
    low, high = hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]
    # Consumers scale by partitions: members beyond the partition count would sit idle.
    assert 2 <= low <= high <= int(_config(docs)["NBV_KAFKA_PARTITIONS"])
    # CPU utilisation is a ratio of the request: without one the HPA cannot act.
    assert "cpu" in resources["requests"]

    pdb = _one(docs, "PodDisruptionBudget", name)
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    # Below the minimum replica count, or a node drain could never evict any pod.
    assert pdb["spec"]["minAvailable"] < low


def test_decision_reads_the_shared_model_registry(docs: list[Doc]) -> None:
    _, pod = _workload(docs, "Deployment", "nbv-decision")
    [container] = pod["containers"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
    assert mount["mountPath"] == _config(docs)["NBV_MODEL_DIR"] and mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == "models")
    claim = _one(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert "ReadWriteMany" in claim["spec"]["accessModes"]


def test_the_migration_job_runs_nbv_migrate(docs: list[Doc]) -> None:
    job, pod = _workload(docs, "Job", "nbv-migrate")
    [container] = pod["containers"]
    assert container["image"] == "nbv" and container["args"] == ["migrate"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    assert job["spec"]["backoffLimit"] >= 1
    _check_env_from(docs, container)
    _check_pod_security(pod, container, _image_uid())
