"""The alert rules (k8s/base/alerts/llm-alerts.yaml) check, pass their promtool unit tests, and stay tied
to the docs.

The PrometheusRule is the only copy of the rules; its `spec` is a plain rule file, which these tests
write out for promtool: `promtool check rules`, then `promtool test rules` on llm-alerts.test.yaml. Every
alert has a unit test that fires it and one that keeps it silent, and both kinds are shown to depend on
the rule (they fail against a rule that always fires, or never does). Every runbook_url points at a
heading of docs/operations.md, and every metric a rule reads is one docs/metrics.md documents (or
Prometheus' `up` and kube-state-metrics' `kube_*`).

The helpers (metric names of a PromQL expression, `promtool check rules` of expressions) also serve the
dashboard and KEDA checks of tests/test_k8s_manifests.py.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from prometheus_server import promtool

ROOT = Path(__file__).resolve().parents[1]
ALERTS_DIR = ROOT / "k8s" / "base" / "alerts"
RULES = ALERTS_DIR / "llm-alerts.yaml"
RULE_TESTS = ALERTS_DIR / "llm-alerts.test.yaml"
RULES_FILE_NAME = "llm-alerts.rules.yaml"  # what the unit tests' rule_files name; written by these tests
OPERATIONS = ROOT / "docs" / "operations.md"
METRICS_DOC = ROOT / "docs" / "metrics.md"
RUNBOOK_BASE = "https://github.com/example/llm-stream-serve/blob/main/docs/operations.md"
SEVERITIES = {"critical", "warning"}
# Series that are not ours: Prometheus' scrape health and kube-state-metrics.
EXTERNAL_METRIC = re.compile(r"up|kube_\w+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "inf", "nan"}


# -- helpers ------------------------------------------------------------------------------------------
def rule_spec() -> dict[str, Any]:
    """The PrometheusRule's spec: a plain Prometheus rule file ({"groups": [...]})."""
    rule = yaml.safe_load(RULES.read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert set(rule["spec"]) == {"groups"}
    return rule["spec"]


def alerts() -> list[dict[str, Any]]:
    return [r for g in rule_spec()["groups"] for r in g["rules"] if "alert" in r]


def unit_tests() -> dict[str, Any]:
    return yaml.safe_load(RULE_TESTS.read_text())


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\b\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?\b", " ", text)  # numbers, durations
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[m.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if m.group().lower() not in PROMQL_KEYWORDS:
            names.add(m.group())
    return names


def documented_metrics() -> dict[str, str]:
    """name -> type of every metric in docs/metrics.md's tables."""
    rows = re.findall(r"^\| `([a-z0-9_:]+)` \| (\w+)", METRICS_DOC.read_text(), flags=re.MULTILINE)
    assert len(rows) >= 30, "docs/metrics.md's tables were not found"
    return dict(rows)


def undocumented(names: set[str]) -> set[str]:
    """Of `names`, those neither documented (a histogram's series included) nor external."""
    documented = documented_metrics()
    histograms = {n for n, t in documented.items() if t == "histogram"}
    missing = set()
    for name in names:
        if EXTERNAL_METRIC.fullmatch(name) or name in documented:
            continue
        if any(name.endswith(s) and name.removesuffix(s) in histograms for s in HISTOGRAM_SUFFIXES):
            continue
        missing.add(name)
    return missing


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def heading_anchors(path: Path) -> set[str]:
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", path.read_text(), flags=re.MULTILINE)}


def run_promtool(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    path = promtool()
    if path is None:
        pytest.skip("promtool is not installed (make install unpacks Debian's prometheus package)")
    return subprocess.run([path, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def check_promql(exprs: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`promtool check rules` on the expressions as recording rules (name -> expr): parses each one."""
    rules = [{"record": f"check:{name}", "expr": expr} for name, expr in exprs.items()]
    rule_file = {"groups": [{"name": "check", "rules": rules}]}
    (tmp_path / "check.rules.yaml").write_text(yaml.safe_dump(rule_file))
    return run_promtool(["check", "rules", "check.rules.yaml"], tmp_path)


def write_unit_test_dir(tmp_path: Path, spec: dict[str, Any]) -> Path:
    """The unit tests beside `spec` written as the rule file they name; returns the test file's path."""
    (tmp_path / RULES_FILE_NAME).write_text(yaml.safe_dump(spec, sort_keys=False))
    return Path(shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name))


def failed_unit_tests(output: str) -> set[str]:
    """Names of the test groups promtool reports as failed."""
    return set(re.findall(r"^\s*name: (.*),\s*$", output, flags=re.MULTILINE))


def cases() -> list[tuple[str, str, bool]]:
    """(test group name, alertname, fires) of every alert_rule_test of the unit tests."""
    return [
        (group["name"], case["alertname"], bool(case.get("exp_alerts")))
        for group in unit_tests()["tests"]
        for case in group.get("alert_rule_test", [])
    ]


def output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


# -- promtool -----------------------------------------------------------------------------------------
def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    (tmp_path / RULES_FILE_NAME).write_text(yaml.safe_dump(rule_spec(), sort_keys=False))
    result = run_promtool(["check", "rules", RULES_FILE_NAME], tmp_path)
    assert result.returncode == 0, output(result)
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout, output(result)


def test_promtool_unit_tests_pass(tmp_path: Path) -> None:
    test_file = write_unit_test_dir(tmp_path, rule_spec())
    result = run_promtool(["test", "rules", test_file.name], tmp_path)
    assert result.returncode == 0, output(result)
    assert "SUCCESS" in result.stdout, output(result)


@pytest.mark.parametrize("mode", ["always", "never"])
def test_unit_tests_depend_on_the_rules(tmp_path: Path, mode: str) -> None:
    """Against rules that always fire, every silent case fails; against rules that never fire, every
    firing case does: no case passes whatever the rule says."""
    spec = copy.deepcopy(rule_spec())
    for group in spec["groups"]:
        for rule in group["rules"]:
            rule["expr"] = "vector(1)" if mode == "always" else "vector(1) < 0"
            rule.pop("for", None)
    test_file = write_unit_test_dir(tmp_path, spec)
    result = run_promtool(["test", "rules", test_file.name], tmp_path)
    assert result.returncode != 0, output(result)
    should_fail = {name for name, _, fires in cases() if fires == (mode == "never")}
    assert should_fail and should_fail <= failed_unit_tests(result.stdout + result.stderr), output(result)


# -- structure ----------------------------------------------------------------------------------------
def test_every_alert_has_a_case_that_fires_and_one_that_stays_silent() -> None:
    assert unit_tests()["rule_files"] == [RULES_FILE_NAME]
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names)) >= 8
    tested = cases()
    assert {alert for _, alert, _ in tested} <= set(names), "a unit test names an alert that does not exist"
    for name in names:
        assert any(a == name and fires for _, a, fires in tested), f"{name}: no case where it fires"
        assert any(a == name and not fires for _, a, fires in tested), f"{name}: no case where it is silent"
    groups = [g["name"] for g in unit_tests()["tests"]]
    assert len(groups) == len(set(groups)), "test group names must be unique (failures are reported by name)"


def test_every_alert_has_severity_summary_description_and_a_runbook() -> None:
    anchors = heading_anchors(OPERATIONS)
    for alert in alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in SEVERITIES, name
        notes = alert["annotations"]
        assert notes["summary"].strip() and notes["description"].strip(), name
        url = urlparse(notes["runbook_url"])
        assert f"{url.scheme}://{url.netloc}{url.path}" == RUNBOOK_BASE, name
        assert url.fragment == name.lower(), f"{name}: its runbook is the heading named after it"
        assert url.fragment in anchors, f"{name}: docs/operations.md has no heading #{url.fragment}"


def test_the_rules_read_only_documented_metrics() -> None:
    used: set[str] = set()
    for alert in alerts():
        names = promql_metric_names(alert["expr"])
        assert names, f"{alert['alert']}: no metric found in {alert['expr']!r}"
        used |= names
    assert not undocumented(used), f"metrics not in docs/metrics.md: {sorted(undocumented(used))}"
    assert {"llm_time_to_first_token_seconds_bucket", "llm_requests_total", "llm_worker_ready"} <= used


def test_metric_name_parsing() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (namespace, le) (rate(a_bucket{le="+Inf", x=~"y|z"}[5m]))) > 2e3\n'
        'and on (pod) max without (gpu) (b / c offset 5m) or absent(d{job="e"}) unless f:g[10m:1m] > bool 1'
    )
    assert promql_metric_names(expr) == {"a_bucket", "b", "c", "d", "f:g"}
    assert undocumented({"llm_time_to_first_token_seconds_bucket", "up", "kube_pod_info"}) == set()
    assert undocumented({"llm_requests_total_bucket", "llm_nonexistent", "upx"}) == {
        "llm_requests_total_bucket",
        "llm_nonexistent",
        "upx",
    }


def test_github_anchors() -> None:
    assert github_anchor("LLMNoWorkerReady") == "llmnoworkerready"
    assert github_anchor("Live stats and `worker.top`") == "live-stats-and-workertop"
