"""deploy/monitoring (issue 15): the alert rules and the Grafana dashboard use only metrics the services
define (provisioning_common.metrics), and their PromQL is valid. promtool (Debian's package `prometheus`,
or PROMTOOL=/path/to/promtool) checks the rules, runs alerts_test.yaml and parses every dashboard query;
without it those three tests are skipped and the structure checks below still run."""

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
from provisioning_common import metrics

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
METRIC = re.compile(r"\b(provisioning_[a-z0-9_]+)")
#: Grafana's own variables, as Prometheus would see them once Grafana substituted them.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def promtool() -> str:
    found = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not found:
        pytest.skip("promtool is not installed (apt-get install prometheus, or PROMTOOL=/path/to/promtool)")
    return found


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def used_metrics(expr: str) -> set[str]:
    """Metric families an expression names (a histogram's _bucket/_count/_sum series as its family)."""
    unquoted = re.sub(r'"[^"]*"', '""', expr)  # label values are not metric names
    return {re.sub(r"_(bucket|count|sum)$", "", name) for name in METRIC.findall(unquoted)}


def balanced(expr: str) -> bool:
    depth = {"(": 0, "[": 0, "{": 0}
    closing = {")": "(", "]": "[", "}": "{"}
    for char in re.sub(r'"[^"]*"', "", expr):
        if char in depth:
            depth[char] += 1
        elif char in closing:
            depth[closing[char]] -= 1
            if depth[closing[char]] < 0:
                return False
    return not any(depth.values())


def test_alert_rules_are_complete_and_use_only_defined_metrics() -> None:
    found = rules()
    names = [rule["alert"] for rule in found]
    assert len(names) == len(set(names))
    assert {"ProvisioningNoSuccess", "ProvisioningTimeoutRatioHigh", "ProvisioningCoreDown"} <= set(names)
    for rule in found:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert balanced(rule["expr"]), rule["alert"]
        assert used_metrics(rule["expr"]), rule["alert"]
        assert used_metrics(rule["expr"]) <= metrics.NAMES, (rule["alert"], used_metrics(rule["expr"]) - metrics.NAMES)


def test_the_dashboard_is_grafana_json_over_defined_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    datasources = {variable["name"] for variable in dashboard["templating"]["list"] if variable["type"] == "datasource"}
    used: set[str] = set()
    for panel in panels:
        assert panel["type"] in {"timeseries", "stat"} and panel["title"], panel
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"]["uid"].strip("${}") in datasources
        for target in panel["targets"]:
            assert balanced(target["expr"]), target["expr"]
            assert used_metrics(target["expr"]) <= metrics.NAMES, target["expr"]
            used |= used_metrics(target["expr"])
    # Every metric the services define is on the dashboard (the service_info is the "up" panel).
    assert used == metrics.NAMES, metrics.NAMES - used


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_fires_each_alert_on_its_failure() -> None:
    result = subprocess.run([promtool(), "test", "rules", "alerts_test.yaml"], cwd=MONITORING, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {test["alertname"] for case in yaml.safe_load((MONITORING / "alerts_test.yaml").read_text())["tests"]
              for test in case["alert_rule_test"] if test["exp_alerts"]}
    assert tested == {rule["alert"] for rule in rules()}  # each alert is seen firing at least once


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each query, with Grafana's variables substituted, as a recording rule: promtool parses its PromQL."""
    queries = dashboard_queries()
    for variable, value in GRAFANA_VARIABLES.items():
        queries = [query.replace(variable, value) for query in queries]
    recorded = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": query}
                                                           for i, query in enumerate(queries)]}]}
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(recorded))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
