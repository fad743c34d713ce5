"""deploy/: the Prometheus alert rules pass promtool (syntax and their unit tests), and the Grafana dashboard has
the expected structure, valid PromQL, and only metrics kiq exports."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "kiq-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "kiq-alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "kiq-dashboard.json"
METRIC = re.compile(r"\bkiq_[a-z0-9_]+\b")
TOPICS = ("Throughput", "Latency by stage", "Queue depth", "Oldest queued job", "Failures by type", "Device memory",
          "cache hit")  # fmt: skip

SCHEMA = {
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[a-z0-9-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 30},
        "panels": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "type", "title", "gridPos", "targets", "datasource"],
                "properties": {
                    "id": {"type": "integer"},
                    "type": {"enum": ["timeseries", "stat", "gauge", "bargauge", "table"]},
                    "title": {"type": "string", "minLength": 1},
                    "gridPos": {
                        "type": "object",
                        "required": ["x", "y", "w", "h"],
                        "properties": {
                            "x": {"type": "integer", "minimum": 0, "maximum": 23},
                            "w": {"type": "integer", "minimum": 1, "maximum": 24},
                        },
                    },
                    "targets": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["refId", "expr"],
                            "properties": {"expr": {"type": "string", "minLength": 1}},
                        },
                    },
                },
            },
        },
    },
}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is missing: apt-get install prometheus (.ci/run does) to check the alert rules")
    return found


def exported() -> set[str]:
    """Every sample name kiq's processes export: the worker's metrics and the queue metrics."""
    from prometheus_client import REGISTRY

    import worker.metrics  # noqa: F401 - registers the worker's metrics
    from producer.metrics import Snapshot, _scrape_ok, families

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    snap = Snapshot(depth={("q", "0"): 1}, oldest={("q", "0"): 1.0}, workers=[("cpu:0", "q", "")])
    names = set()
    for family in [*REGISTRY.collect(), *families(snap), _scrape_ok(1)]:
        names.update(family.name + suffix for suffix in suffixes.get(family.type, [""]))
    return {n for n in names if n.startswith("kiq_")}


def dashboard_exprs() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in board["panels"] for target in panel["targets"]]


def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    tool = promtool()
    for argv in ([tool, "check", "rules", str(RULES)], [tool, "test", "rules", str(RULE_TESTS)]):
        done = subprocess.run(argv, capture_output=True, text=True, cwd=RULES.parent, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_alerts_the_issue_asks_for_are_there_and_use_exported_metrics():
    rules = [r for group in yaml.safe_load(RULES.read_text())["groups"] for r in group["rules"]]
    names = {r["alert"] for r in rules}
    assert {"KiqOldestJobTooOld", "KiqQueueWithoutWorkers", "KiqFailureRatioHigh", "KiqWebhookBacklog",
            "KiqLeaseRenewalFailures"} <= names  # fmt: skip
    tested = {
        t["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for t in test["alert_rule_test"]
    }
    assert names <= tested, "every alert has a promtool unit test"
    known = exported()
    for rule in rules:
        assert set(METRIC.findall(rule["expr"])) <= known, (rule["alert"], set(METRIC.findall(rule["expr"])) - known)


def test_dashboard_structure_and_every_query_names_an_exported_metric():
    board = json.loads(DASHBOARD.read_text())
    jsonschema.validate(board, SCHEMA)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    known = exported()
    for title, expr in dashboard_exprs():
        used = set(METRIC.findall(expr))
        assert used and used <= known, (title, used - known)
    titles = " ".join(panel["title"] for panel in board["panels"])
    assert all(topic.lower() in titles.lower() for topic in TOPICS), titles


def test_dashboard_queries_are_valid_promql(tmp_path):
    tool = promtool()
    records = [{"record": f"kiq:panel_{n}", "expr": expr} for n, (_, expr) in enumerate(dashboard_exprs())]
    rules = {"groups": [{"name": "dashboard", "rules": records}]}
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_docs_list_every_panel():
    docs = (ROOT / "docs" / "operations" / "observability.md").read_text()
    board = json.loads(DASHBOARD.read_text())
    missing = [panel["title"] for panel in board["panels"] if panel["title"] not in docs]
    assert not missing, f"docs/operations/observability.md does not list these panels: {missing}"
