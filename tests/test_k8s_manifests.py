"""The Kubernetes manifests agree with the code they deploy.

Every env var a manifest sets is one the process reads; the ConfigMap validates through
WorkerSettings itself; KEDA watches the stream and group the code uses (or, in the keda-prometheus
overlay, a PromQL query over documented metrics); the grace period covers the drain timeout; the
probes are HTTP GETs on the worker's metrics port, and a real worker answers them there; the
PodMonitors select the pods and ports that serve /metrics and give the job names the alert rules
select on; the dashboard's LogQL reads events and fields that a real worker logs, from the container
the Deployment runs, and its PromQL parses and reads documented metrics.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings
from test_alert_rules import alerts, check_promql, promql_metric_names, undocumented

from producer.bulk import BulkSettings
from producer.client import ChatClient, ChatError
from producer.gateway.api_keys import KeyRing
from producer.gateway.settings import GatewaySettings
from producer.settings import ProducerSettings
from producer.wire.keys import CONSUMER_GROUP, requests_stream
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
BASE = K8S / "base"
DASHBOARD = BASE / "dashboards" / "llm-workers.json"
ALERT_RULES = BASE / "alerts" / "llm-alerts.yaml"
KEDA_PROMETHEUS = K8S / "overlays" / "keda-prometheus"
SECRET_TEMPLATE = K8S / "redis-secret.template.yaml"
GATEWAY_KEYS_TEMPLATE = K8S / "gateway-keys-secret.template.yaml"

# Env vars set for third-party runtimes, not read by our settings: each with its reason.
RUNTIME_ENV = {
    "HF_HUB_OFFLINE": "huggingface_hub: never reach the Hub at run time",
    "TRANSFORMERS_OFFLINE": "transformers: same",
    "HOME": "libraries that cache under ~ write to the /tmp emptyDir (read-only root filesystem)",
    "PYTHONUNBUFFERED": "log lines reach the collector at once",
}
# Minimum time between the end of the drain and SIGKILL: hand back leftovers, delete the heartbeat, exit.
DRAIN_EXIT_MARGIN_S = 10
# The longest model load the worker's startup probe must allow (a GGUF's first conversion included).
MODEL_LOAD_S = 15 * 60


# -- loading ------------------------------------------------------------------------------------------
def manifest_files() -> list[Path]:
    """Every Kubernetes YAML file; not the promtool unit tests of the alert rules (`*.test.yaml`)."""
    return sorted(
        p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml") and not p.name.endswith(".test.yaml")
    )


def load_all() -> list[dict[str, Any]]:
    docs = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None and doc.get("kind") != "Kustomization":
                doc["__file__"] = path
                docs.append(doc)
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def kustomize(target: str | Path) -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed")
    out = subprocess.run(
        ["kubectl", "kustomize", str(target)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def container_env(docs: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, Any]:
    """Env of a container: ConfigMap data (envFrom) overlaid by its own `env` entries (value or source)."""
    env: dict[str, Any] = {}
    for source in c.get("envFrom", []):
        env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in c.get("env", []):
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env


def settings_env_names(cls: type[BaseSettings]) -> set[str]:
    """The environment variable names a pydantic-settings class reads."""
    names: set[str] = set()
    prefix = cls.model_config.get("env_prefix", "")
    for name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(a) for a in alias.choices)
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def env_read_by_code(package: str) -> set[str]:
    """Env vars a package reads directly with os.environ (outside its settings class)."""
    pattern = re.compile(r"os\.environ(?:\.get\(|\[)\s*\"([A-Z0-9_]+)\"")
    return {m for p in (ROOT / package).rglob("*.py") for m in pattern.findall(p.read_text())}


def logged_events(package: str) -> set[str]:
    pattern = re.compile(r"log\.(?:debug|info|warning|error|exception|critical)\(\s*\"(\w+)\"")
    return {m for p in (ROOT / package).rglob("*.py") for m in pattern.findall(p.read_text())}


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return load_all()


@pytest.fixture()
def worker_settings(docs, monkeypatch: pytest.MonkeyPatch) -> WorkerSettings:
    """WorkerSettings exactly as a worker pod builds them from the manifests."""
    worker = container(find(docs, "Deployment", "llm-worker"), "worker")
    for name, value in container_env(docs, worker).items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("REDIS_URL", secret_template()["redis-url"])
    monkeypatch.setenv("LLM_CONSUMER_NAME", "llm-worker-abc12-xyz")  # the pod name, via the downward API
    return WorkerSettings()


def secret_template() -> dict[str, str]:
    return yaml.safe_load(SECRET_TEMPLATE.read_text())["stringData"]


# -- structure ----------------------------------------------------------------------------------------
def test_every_manifest_parses_and_names_its_object(docs) -> None:
    assert len(manifest_files()) >= 10
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), doc["__file__"]
        assert doc["metadata"].get("name"), doc["__file__"]
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "ScaledObject",
        "TriggerAuthentication",
        "StatefulSet",
        "Service",
        "Namespace",
        "PodMonitor",
        "PrometheusRule",
    } <= kinds


def test_kustomizations_reference_existing_files_and_leave_out_the_secret_template() -> None:
    listed: set[Path] = set()
    for kfile in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(kfile.read_text())
        for entry in k.get("resources", []):
            path = (kfile.parent / entry).resolve()
            assert path.exists(), f"{kfile}: missing resource {entry}"
            listed.add(path)
        for gen in k.get("configMapGenerator", []):
            for f in gen.get("files", []):
                assert (kfile.parent / f).is_file(), f"{kfile}: missing file {f}"
                listed.add((kfile.parent / f).resolve())
    # Every manifest is deployed by some kustomization, except the Secret templates: applying a
    # committed placeholder would overwrite the real credentials.
    for path in manifest_files():
        if path.name == "kustomization.yaml":
            continue
        assert (path.resolve() in listed) == (not path.name.endswith(".template.yaml")), path
    assert {p.name for p in K8S.glob("*.template.yaml")} == {SECRET_TEMPLATE.name, GATEWAY_KEYS_TEMPLATE.name}
    assert DASHBOARD.resolve() in listed and ALERT_RULES.resolve() in listed
    # The alert rules' unit tests sit beside them, and no kustomization deploys them.
    assert (BASE / "alerts" / "llm-alerts.test.yaml").resolve() not in listed


@pytest.mark.parametrize("target", ["k8s", "k8s/overlays/production", "k8s/overlays/keda-prometheus"])
def test_kustomize_builds(target: str) -> None:
    built = kustomize(target)
    kinds = {d["kind"] for d in built}
    assert {"Deployment", "ScaledObject", "PodDisruptionBudget", "PodMonitor", "PrometheusRule"} <= kinds
    assert ("StatefulSet" in kinds) == (target == "k8s"), "production must not run the in-cluster Redis"
    assert {d["metadata"].get("namespace") for d in built if d["kind"] != "Namespace"} == {"llm-serving"}
    # The dashboard's generated ConfigMap is there; the exec probes' script is gone.
    generated = {d["metadata"]["name"] for d in built if d["kind"] == "ConfigMap"}
    assert "llm-grafana-dashboard" in generated
    assert not any(name.startswith("llm-worker-probes") for name in generated)


# -- env vars -----------------------------------------------------------------------------------------
def check_env_names(env: dict[str, Any], allowed: set[str], where: str) -> None:
    for name in env:
        if name.startswith("LLM_") or name in {"REDIS_URL", "MODEL"}:
            assert name in allowed, f"{where}: {name} is not a setting the process reads"
        else:
            assert name in RUNTIME_ENV, f"{where}: {name} is neither a setting nor a known runtime variable"


def test_worker_env_vars_are_real_settings(docs) -> None:
    worker = container(find(docs, "Deployment", "llm-worker"), "worker")
    env = container_env(docs, worker)
    check_env_names(env, settings_env_names(WorkerSettings) | env_read_by_code("worker"), "llm-worker")
    assert env["REDIS_URL"] == {"secretKeyRef": {"name": "llm-redis", "key": "redis-url"}}
    # The consumer name is the pod name, stable across container restarts (a restarted worker replays
    # its own pending entries).
    assert env["LLM_CONSUMER_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_bulk_worker_env_vars_are_real_settings(docs, monkeypatch: pytest.MonkeyPatch) -> None:
    bulk = container(find(docs, "Deployment", "llm-bulk-worker"), "bulk-worker")
    assert bulk["command"] == ["llm-bulk", "worker"]  # the console script of pyproject.toml
    env = container_env(docs, bulk)
    allowed = settings_env_names(ProducerSettings) | settings_env_names(BulkSettings)
    check_env_names(env, allowed, "llm-bulk-worker")
    for name, value in env.items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    bulk_settings = BulkSettings()
    assert bulk_settings.queue == env["LLM_BULK_QUEUE"]
    assert bulk_settings.max_in_flight_requests == int(env["LLM_BULK_MAX_IN_FLIGHT_REQUESTS"])


def test_configmap_validates_as_worker_settings(docs, worker_settings: WorkerSettings) -> None:
    data = find(docs, "ConfigMap", "llm-worker-config")["data"]
    assert worker_settings.engine == data["LLM_ENGINE"]
    assert worker_settings.model == data["MODEL"]
    assert worker_settings.drain_timeout_s == float(data["LLM_DRAIN_TIMEOUT_S"])
    assert worker_settings.heartbeat_ttl_s >= 3 * worker_settings.heartbeat_interval_s
    assert worker_settings.max_waiting_requests <= 4 * worker_settings.max_num_seqs


def test_secret_keys_referenced_exist_in_the_template(docs) -> None:
    template = find(docs, "Secret", "llm-redis")
    assert template["__file__"] == SECRET_TEMPLATE
    keys = set(template["stringData"])
    refs = []
    for d in docs:
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            refs += [
                e["valueFrom"]["secretKeyRef"]
                for e in c.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})
            ]
    refs += [
        {"name": r["name"], "key": r["key"]}
        for r in find(docs, "TriggerAuthentication", "llm-redis")["spec"]["secretTargetRef"]
    ]
    assert refs
    for ref in refs:
        assert ref["name"] == "llm-redis" and ref["key"] in keys, ref


# -- worker pod ---------------------------------------------------------------------------------------
def test_grace_period_covers_the_drain_timeout(docs, worker_settings: WorkerSettings) -> None:
    spec = find(docs, "Deployment", "llm-worker")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= worker_settings.drain_timeout_s + DRAIN_EXIT_MARGIN_S
    # SIGTERM drains; a preStop hook would only delay it.
    assert "lifecycle" not in container(find(docs, "Deployment", "llm-worker"), "worker")


def test_worker_pod_requests_a_gpu_and_leaves_replicas_to_keda(docs, worker_settings: WorkerSettings) -> None:
    deployment = find(docs, "Deployment", "llm-worker")
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    resources = container(deployment, "worker")["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    assert worker_settings.resolved_device() == "cuda"
    pdb = find(docs, "PodDisruptionBudget", "llm-worker")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_worker_probes_are_http_gets_on_the_metrics_port(docs, worker_settings: WorkerSettings) -> None:
    deployment = find(docs, "Deployment", "llm-worker")
    c = container(deployment, "worker")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    # The port the worker serves (LLM_METRICS_PORT, from the ConfigMap) is the named container port.
    assert ports == {"metrics": int(container_env(docs, c)["LLM_METRICS_PORT"])}
    paths = {}
    for kind in ("startup", "readiness", "liveness"):
        probe = c[f"{kind}Probe"]
        assert set(probe) & {"exec", "tcpSocket", "grpc"} == set(), f"{kind}: an HTTP probe only"
        assert probe["httpGet"]["port"] == "metrics", kind
        assert probe["timeoutSeconds"] < probe["periodSeconds"], kind
        paths[kind] = probe["httpGet"]["path"]
    # Ready (and started) while the worker consumes; live while its loop runs (docs/metrics.md).
    assert paths == {"startup": "/ready", "readiness": "/ready", "liveness": "/health"}
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= MODEL_LOAD_S, "shorter than a model load"
    # Liveness may only fail after the heartbeat TTL has lapsed for several periods.
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 2 * worker_settings.heartbeat_ttl_s
    # Nothing is left of the exec probes' script and its volume.
    assert "volumeMounts" not in c or all(m["name"] != "probes" for m in c["volumeMounts"])
    assert all(v["name"] != "probes" for v in deployment["spec"]["template"]["spec"].get("volumes", []))


# -- Prometheus: scraping and alert rules -------------------------------------------------------------
@pytest.mark.parametrize(("name", "container_name"), [("llm-worker", "worker"), ("llm-gateway", "gateway")])
def test_podmonitor_selects_the_pods_and_their_metrics_port(docs, name: str, container_name: str) -> None:
    monitor = find(docs, "PodMonitor", name)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    deployment = find(docs, "Deployment", name)
    labels = pod_labels(deployment)
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items(), "the PodMonitor must select the Deployment's pods"
    others = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and d is not deployment]
    assert others and not any(selector.items() <= pod_labels(d).items() for d in others), "and only them"
    # Its own namespace (kustomize sets it): no namespaceSelector that would look elsewhere.
    assert "namespaceSelector" not in monitor["spec"]
    ports = {p["name"] for p in container(deployment, container_name)["ports"]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    # The job is the pods' label named by jobLabel: the job the alert rules select on.
    assert labels[monitor["spec"]["jobLabel"]] == name
    assert f'job="{name}"' in " ".join(a["expr"] for a in alerts())


def test_gateway_metrics_share_the_probed_http_port(docs) -> None:
    gateway = container(find(docs, "Deployment", "llm-gateway"), "gateway")
    monitor = find(docs, "PodMonitor", "llm-gateway")
    probe_ports = {gateway[f"{k}Probe"]["httpGet"]["port"] for k in ("liveness", "readiness")}
    assert probe_ports == {monitor["spec"]["podMetricsEndpoints"][0]["port"]} == {"http"}


def test_prometheus_rule_loads_and_matches_the_worker_pods(docs) -> None:
    rule = find(docs, "PrometheusRule", "llm-alerts")
    assert rule["__file__"] == ALERT_RULES and rule["apiVersion"] == "monitoring.coreos.com/v1"
    groups = rule["spec"]["groups"]
    assert groups and all(g["name"] and g["rules"] for g in groups)
    assert all(r["alert"] and r["expr"] for g in groups for r in g["rules"])
    # The restart alert names the worker's real container and matches its pods' names, not the others'.
    deployment = find(docs, "Deployment", "llm-worker")
    restarts = next(a["expr"] for a in alerts() if "kube_pod_container_status_restarts_total" in a["expr"])
    assert re.findall(r'container="([^"]+)"', restarts) == [container(deployment, "worker")["name"]]
    (pod_pattern,) = re.findall(r'pod=~"([^"]+)"', restarts)
    assert re.fullmatch(pod_pattern, f"{deployment['metadata']['name']}-7d9f8c6b5-x2k4p")
    for other in ("llm-bulk-worker", "llm-gateway"):
        other_pod = f"{find(docs, 'Deployment', other)['metadata']['name']}-5c6b9d7f4-a1b2c"
        assert not re.fullmatch(pod_pattern, other_pod)


# -- KEDA ---------------------------------------------------------------------------------------------
def test_keda_scales_on_the_stream_and_group_the_code_uses(docs, worker_settings: WorkerSettings) -> None:
    scaled = find(docs, "ScaledObject", "llm-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "llm-worker"
    triggers = {t["name"]: t for t in scaled["spec"]["triggers"]}
    assert set(triggers) == {"requests-lag", "requests-pending"}
    redis_service = find(docs, "Service", "llm-redis")
    for trigger in triggers.values():
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert meta["stream"] == requests_stream(worker_settings.prefix)
        assert meta["consumerGroup"] == worker_settings.group == CONSUMER_GROUP
        port = redis_service["spec"]["ports"][0]["port"]
        assert meta["address"] == f"llm-redis.llm-serving.svc.cluster.local:{port}"
        assert trigger["authenticationRef"]["name"] == "llm-redis"
    lag = triggers["requests-lag"]["metadata"]
    assert int(lag["lagCount"]) > 0 and int(lag["activationLagCount"]) >= 0
    assert "pendingEntriesCount" not in lag
    pending = triggers["requests-pending"]["metadata"]
    # One pod per batch of requests a GPU runs at once.
    assert int(pending["pendingEntriesCount"]) == worker_settings.max_num_seqs


def test_keda_prometheus_overlay_scales_on_documented_metrics(docs, tmp_path: Path) -> None:
    built = kustomize(KEDA_PROMETHEUS)
    (scaled,) = [d for d in built if d["kind"] == "ScaledObject"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    query = meta["query"]
    # The demand the two Redis triggers measure: lag + pending, one pod per GPU-full of requests.
    assert promql_metric_names(query) == {"llm_queue_lag", "llm_queue_length", "llm_queue_pending"}
    assert not undocumented(promql_metric_names(query))
    # Group-level gauges, reported by every worker: reduced with max over pods, never summed per pod.
    assert query.count("max by (tenant)") == 2
    assert set(re.findall(r'namespace="([^"]+)"', query)) == {scaled["metadata"]["namespace"]}
    base_triggers = {t["name"]: t for t in find(docs, "ScaledObject", "llm-worker")["spec"]["triggers"]}
    assert int(meta["threshold"]) == int(base_triggers["requests-pending"]["metadata"]["pendingEntriesCount"])
    assert meta["serverAddress"].startswith("http")
    # Worker metrics vanish with the last worker: this trigger cannot wake the Deployment from zero.
    assert scaled["spec"]["minReplicaCount"] >= 1
    assert "TriggerAuthentication" not in {d["kind"] for d in built}
    result = check_promql({"keda_backlog": query}, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dev_redis_is_durable_and_never_evicts() -> None:
    conf = dict(
        line.split(None, 1)
        for line in (K8S / "redis" / "redis.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#") and not line.startswith("save")
    )
    assert conf["appendonly"] == "yes"
    assert conf["maxmemory-policy"] == "noeviction"


# -- probes against a real worker ---------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def test_a_worker_answers_its_probes_on_the_metrics_port(docs, start_worker) -> None:
    """The paths the Deployment probes are served by a real worker on LLM_METRICS_PORT (a free port here)."""
    c = container(find(docs, "Deployment", "llm-worker"), "worker")
    paths = {c[f"{kind}Probe"]["httpGet"]["path"] for kind in ("startup", "readiness", "liveness")}
    port = free_port()
    worker = start_worker("echo", metrics_port=port)
    deadline = time.monotonic() + 30
    status = {}
    while time.monotonic() < deadline:
        status = {path: http_status(f"http://127.0.0.1:{port}{path}") for path in sorted(paths)}
        if set(status.values()) == {200}:
            break
        time.sleep(0.2)
    assert set(status.values()) == {200}, (status, worker.log_path.read_text()[-2000:])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert re.search(r"^llm_worker_ready 1(\.0)?$", resp.read().decode(), flags=re.MULTILINE)


# -- dashboard ----------------------------------------------------------------------------------------
def dashboard_targets(kind: str) -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t for p in dashboard["panels"] for t in p.get("targets", []) if t["datasource"]["type"] == kind]


def dashboard_exprs() -> list[str]:
    """The LogQL queries (the Loki panels')."""
    return [t["expr"] for t in dashboard_targets("loki")]


def test_dashboard_is_valid_grafana_json_over_prometheus_and_loki(docs) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "loki"
    assert variables["prometheus"]["query"] == "prometheus"
    assert variables["datasource"]["type"] == variables["prometheus"]["type"] == "datasource"
    assert variables["namespace"]["query"] == find(docs, "Namespace", "llm-serving")["metadata"]["name"]
    uid = {"loki": "${datasource}", "prometheus": "${prometheus}"}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            kind = target["datasource"]["type"]
            assert kind in uid and target["datasource"]["uid"] == uid[kind], panel["title"]
            assert panel["datasource"] == target["datasource"], panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    # Its stream selector matches the worker container the Deployment runs.
    containers = {m for e in dashboard_exprs() for m in re.findall(r'container="([^"]+)"', e)}
    assert containers == {container(find(docs, "Deployment", "llm-worker"), "worker")["name"]}
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for needed in ("first token", "queue", "tokens/s", "batch", "code"):
        assert needed in titles
    # Panels do not overlap on Grafana's 24-column grid.
    cells = [
        (x, y)
        for p in dashboard["panels"]
        for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
        for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])
    ]
    assert len(cells) == len(set(cells)) and all(x < 24 for x, _ in cells)


def test_dashboard_promql_parses_and_reads_documented_metrics(tmp_path: Path) -> None:
    targets = dashboard_targets("prometheus")
    panels = json.loads(DASHBOARD.read_text())["panels"]
    titles = " ".join(p["title"] for p in panels if p.get("datasource", {}).get("type") == "prometheus")
    for needed in ("first token", "output token", "outcome", "tokens/s", "running", "kv cache", "queue lag",
                   "oldest pending", "gpu utilisation", "gpu memory"):  # fmt: skip
        assert needed in titles.lower(), needed
    used: set[str] = set()
    exprs = {}
    for n, target in enumerate(targets):
        expr = target["expr"]
        names = promql_metric_names(expr)
        assert names, expr
        used |= names
        # Every selector is the dashboard's namespace.
        assert expr.count("{") == len(re.findall(r'\{[^}]*namespace="\$namespace"[^}]*\}', expr)), expr
        assert sum(len(re.findall(rf"\b{re.escape(m)}\{{", expr)) for m in names) == expr.count("{"), expr
        exprs[f"panel_{n}"] = expr.replace("$namespace", "llm-serving").replace("$__rate_interval", "1m")
    assert not undocumented(used), f"metrics not in docs/metrics.md: {sorted(undocumented(used))}"
    # What an alert reads can be seen on the dashboard (kube-state-metrics' restarts aside).
    alerted = {m for a in alerts() for m in promql_metric_names(a["expr"]) if not m.startswith("kube_")}
    assert alerted <= used, alerted - used
    result = check_promql(exprs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def queried_fields() -> dict[str, set[str]]:
    """event -> fields the dashboard unwraps or groups by, for each `event="..."` query."""
    fields: dict[str, set[str]] = {}
    for expr in dashboard_exprs():
        events = re.findall(r'\| event="(\w+)"', expr) + [
            e for alt in re.findall(r'\| event=~"([\w|]+)"', expr) for e in alt.split("|")
        ]
        used = set(re.findall(r"unwrap (\w+)", expr))
        used |= {f for group in re.findall(r"by \(([\w, ]*)\)", expr) for f in re.split(r",\s*", group) if f}
        used -= {"pod", "event"}  # labels from the log agent, and the event itself
        for event in events:
            fields.setdefault(event, set()).update(used)
    return fields


def test_dashboard_queries_events_the_worker_logs() -> None:
    emitted = logged_events("worker")
    queried = queried_fields()
    assert {"request_done", "batch_done", "request_invalid", "request_rejected"} <= set(queried)
    assert set(queried) <= emitted, set(queried) - emitted


@pytest.fixture()
def logged_worker(start_worker, chat_client: ChatClient, redis_client, prefix) -> Iterator[Any]:
    """An echo worker that has logged request_done, batch_done, request_rejected and request_invalid."""
    worker = start_worker("echo", max_prompt_tokens=64)
    for n in range(3):
        chat_client.chat([{"role": "user", "content": f"hello there number {n}"}], max_tokens=4)
    with pytest.raises(ChatError):
        chat_client.chat([{"role": "user", "content": "y" * 100}], max_tokens=4)
    invalid = {"v": "1", "ct": "json", "body": '{"id":"bad1","max_tokens":0}'}
    redis_client.xadd(requests_stream(prefix), invalid)
    with pytest.raises(ChatError):
        chat_client.result("bad1", timeout_s=30)
    yield worker


def test_dashboard_fields_are_in_the_workers_log_events(logged_worker) -> None:
    for event, fields in queried_fields().items():
        if event not in {"request_done", "batch_done", "request_invalid", "request_rejected"}:
            continue
        logged = logged_worker.events(event)
        assert logged, f"the worker logged no {event}"
        for field in fields:
            values = [e.get(field) for e in logged]
            assert all(field in e for e in logged), f"{event} lacks {field}"
            if event in {"request_done", "batch_done"} and field not in {"finish_reason"}:
                assert any(isinstance(v, int | float) for v in values), f"{event}.{field} is never numeric"


# -- gateway ------------------------------------------------------------------------------------------
def test_gateway_env_vars_are_real_settings_and_its_probes_are_its_routes(
    docs, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    deployment = find(docs, "Deployment", "llm-gateway")
    gateway = container(deployment, "gateway")
    assert gateway["command"] == ["llm-gateway"]  # the console script of pyproject.toml
    env = container_env(docs, gateway)
    check_env_names(
        env, settings_env_names(GatewaySettings) | settings_env_names(ProducerSettings), "llm-gateway"
    )
    assert env["REDIS_URL"] == {"secretKeyRef": {"name": "llm-redis", "key": "redis-url"}}
    # The keys file is the Secret's key, mounted where the ConfigMap points.
    keys_path = Path(env["LLM_GATEWAY_KEYS_FILE"])
    mount = next(m for m in gateway["volumeMounts"] if m["name"] == "keys")
    assert keys_path.parent == Path(mount["mountPath"])
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "keys")
    template = find(docs, "Secret", volume["secret"]["secretName"])
    assert template["__file__"] == GATEWAY_KEYS_TEMPLATE and keys_path.name in template["stringData"]
    # The template's line has the shape the gateway loads (with a real digest in place of the placeholder).
    line = template["stringData"][keys_path.name].strip().replace("CHANGE-ME", "0" * 64, 1)
    (tmp_path / keys_path.name).write_text(line + "\n")
    assert [k.tenant for k in KeyRing.load(tmp_path / keys_path.name).keys] == ["alice"]
    for name, value in env.items():
        if isinstance(value, str) and name != "LLM_GATEWAY_KEYS_FILE":
            monkeypatch.setenv(name, value)
    settings = GatewaySettings()
    port = gateway["ports"][0]
    assert settings.port == port["containerPort"] and settings.host == "0.0.0.0"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert settings.drain_s + DRAIN_EXIT_MARGIN_S <= grace
    assert (gateway["livenessProbe"]["httpGet"]["path"], gateway["readinessProbe"]["httpGet"]["path"]) == (
        "/health",
        "/ready",
    )
    service = find(docs, "Service", "llm-gateway")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    hpa = find(docs, "HorizontalPodAutoscaler", "llm-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "llm-gateway" and "replicas" not in deployment["spec"]
