"""Deployment artefacts stay in step with the code: the Grafana dashboard only queries metrics that exist, the
Kubernetes manifests validate (`make k8s-lint`), and the Deployment's probes and shutdown budget match the server."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import hyperrec.core.metrics  # noqa: F401  (registers the metrics in the default registry)
from hyperrec.app.config import ENV_PREFIX, ServerConfig, load_config
from hyperrec.core.tokens import parse_tokens

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "hyperrec-dashboard.json"

# What each metric type exposes to Prometheus besides (or instead of) its family name.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}
# The families the dashboard is meant to cover; a panel dropped by mistake shows up here.
COVERED = {
    "hyperrec_grpc_requests_total",
    "hyperrec_grpc_request_duration_seconds_bucket",
    "hyperrec_grpc_requests_in_flight",
    "hyperrec_stage_duration_seconds_bucket",
    "hyperrec_recommendations_total",
    "hyperrec_ranking_fallbacks_total",
    "hyperrec_profile_store_degraded_total",
    "hyperrec_profile_store_breaker_state",
    "hyperrec_events_total",
    "hyperrec_privacy_actions_total",
    "hyperrec_model_loads_total",
    "hyperrec_model_active_version",
    "hyperrec_accelerator_info",
    "hyperrec_batch_size_bucket",
    "hyperrec_cache_requests_total",
}
METRIC_NAME = re.compile(r"\bhyperrec_[a-zA-Z0-9_]+")


def exposed_names() -> set[str]:
    """Every series name the default registry can expose, including those of labelled metrics with no children."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def queries(node: Any) -> list[str]:
    """Every PromQL string in the dashboard: panel targets (`expr`) and template variable queries (`definition`)."""
    if isinstance(node, dict):
        return [
            q
            for key, value in node.items()
            for q in ([value] if key in ("expr", "definition") and isinstance(value, str) else queries(value))
        ]
    if isinstance(node, list):
        return [q for item in node for q in queries(item)]
    return []


def manifests() -> dict[str, dict[str, Any]]:
    """The resources in deploy/k8s by `Kind/name`."""
    resources: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                resources[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return resources


def k8s_lint(directory: Path) -> subprocess.CompletedProcess[str]:
    """`make k8s-lint` over `directory`; `-o` keeps make from reinstalling the venv when pyproject.toml is newer."""
    make = shutil.which("make")
    assert make is not None, "make is not on PATH (sudo apt-get install -y make)"
    return subprocess.run(
        [make, "-s", "-o", ".venv/.installed", "k8s-lint", f"K8S_DIR={directory}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --- the dashboard ---


def test_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = {name for expr in queries(dashboard) for name in METRIC_NAME.findall(expr)}
    known = exposed_names()
    assert used, "no PromQL found in the dashboard"
    assert sorted(used - known) == [], "the dashboard queries metrics hyperrec/core/metrics.py does not define"
    assert sorted(COVERED - used) == [], "metrics with no panel"


def test_dashboard_is_importable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_exposed_names_cover_types() -> None:
    known = exposed_names()
    assert "hyperrec_grpc_request_duration_seconds_bucket" in known  # histogram, no children yet
    assert "hyperrec_events_total" in known  # labelled counter
    assert "hyperrec_grpc_requests_in_flight" in known  # gauge


# --- the manifests ---


def test_k8s_lint_passes() -> None:
    result = k8s_lint(K8S)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("file", "old", "new"),
    [
        # an unknown field (strict mode)
        ("deployment.yaml", "terminationGracePeriodSeconds:", "terminationGracePeriod:"),
        # a value of the wrong type
        ("configmap.yaml", 'HYPERREC_PORT: "50051"', "HYPERREC_PORT: 50051"),
        # a misspelt kind: kubernetes-validate only warns that it has no schema, make k8s-lint fails on it
        ("hpa.yaml", "kind: HorizontalPodAutoscaler", "kind: HorizontalPodAutoscalar"),
    ],
)
def test_k8s_lint_fails_on_a_broken_manifest(tmp_path: Path, file: str, old: str, new: str) -> None:
    for path in K8S.glob("*.yaml"):
        shutil.copy(path, tmp_path / path.name)
    text = (tmp_path / file).read_text()
    assert old in text
    (tmp_path / file).write_text(text.replace(old, new, 1))
    result = k8s_lint(tmp_path)
    assert result.returncode != 0, result.stdout
    assert "k8s-lint: failed" in result.stdout


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_shutdown_budget_and_probes() -> None:
    resources = manifests()
    deployment = resources["Deployment/hyperrec"]
    config = resources["ConfigMap/hyperrec-config"]["data"]
    pod = deployment["spec"]["template"]["spec"]
    drain, grace = float(config["HYPERREC_DRAIN_S"]), float(config["HYPERREC_GRACE_S"])
    # the server exits within drain + grace + 1 s of SIGTERM; the kubelet kills it when the period runs out
    assert pod["terminationGracePeriodSeconds"] > drain + grace + 1

    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == int(config["HYPERREC_PORT"])
    assert ports["metrics"] == int(config["HYPERREC_METRICS_PORT"])
    # the kubelet's gRPC probe speaks plaintext only: probes ask the health-only port, which stays plaintext when
    # TLS is turned on; TLS itself stays off in the default manifests
    assert ports["health"] == int(config["HYPERREC_HEALTH_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["health"], probe
        assert set(container[probe]) & {"httpGet", "tcpSocket", "exec"} == set(), probe
    env = {e["name"] for e in container.get("env", [])} | set(config)
    assert "HYPERREC_TLS_CERT" not in env and "HYPERREC_TLS_KEY" not in env

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == config["HYPERREC_METRICS_PORT"]


def test_secrets_and_security_context() -> None:
    resources = manifests()
    pod = resources["Deployment/hyperrec"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    secret = resources["Secret/hyperrec-secrets"]
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})
    }
    for name in ("HYPERREC_PROFILE_SECRET", "HYPERREC_ADMIN_TOKEN", "HYPERREC_AUTH_TOKENS"):
        assert refs[name] == {"name": "hyperrec-secrets", "key": name}
        assert name in secret["stringData"]
        assert name not in resources["ConfigMap/hyperrec-config"]["data"], f"{name} belongs in the Secret"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["runAsUser"] == 10001
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/srv/model_repo"]["readOnly"] is True
    assert "/tmp" in mounts
    claim = resources["PersistentVolumeClaim/hyperrec-model-repo"]
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]


def test_configmap_and_secret_make_a_valid_config() -> None:
    resources = manifests()
    env = dict(resources["ConfigMap/hyperrec-config"]["data"]) | resources["Secret/hyperrec-secrets"]["stringData"]
    fields = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(ServerConfig)}
    assert sorted(set(env) - fields) == [], "settings the server does not read (misspelt?)"
    config = load_config(env=env)
    assert config.host == "0.0.0.0"
    assert str(config.model_repo) == "/srv/model_repo"
    assert config.log_format == "json"
    assert config.tls_cert is None and config.tls_key is None
    assert {scope for token in parse_tokens(config.auth_tokens) for scope in token.scopes} <= {"recommend", "ingest"}
