"""deploy/prometheus and deploy/grafana: promtool accepts the configs and the rules, the alerts
pass their promtool unit tests, the dashboard's PromQL parses, and every series they name is one
the code serves."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from prometheus_client import REGISTRY

from pdmesh import metrics  # noqa: F401  (registers every service metric in REGISTRY)
from pdmesh.exporter.series import SERIES
from support.deploy_files import DEPLOY, run, tool

PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = json.loads((GRAFANA / "pdmesh.json").read_text())
SERIES_NAME = re.compile(r"\b(pdmesh_[a-z0-9_]+)")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def dashboard_exprs() -> list[str]:
    return [t["expr"] for panel in DASHBOARD["panels"] for t in panel["targets"]]


def as_promql(grafana_expr: str) -> str:
    """Grafana replaces $__rate_interval before Prometheus sees a query."""
    return grafana_expr.replace("$__rate_interval", "1m")


def served_series() -> set[str]:
    names = set(SERIES)
    for family in REGISTRY.collect():
        names |= {sample.name for sample in family.samples}  # labelled metrics may have none yet:
        names.add(family.name + ("_total" if family.type == "counter" else ""))
        if family.type == "histogram":
            names |= {family.name + suffix for suffix in HISTOGRAM_SUFFIXES}
    return names


def test_promtool_accepts_the_compose_config_and_the_rules():
    promtool = tool("promtool")
    run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert "SUCCESS: 9 rules found" in run(promtool, "check", "rules", str(PROMETHEUS / "rules.yaml"))


def test_promtool_accepts_the_kubernetes_scrape_config(tmp_path):
    """Debian's promtool is built without kubernetes_sd: check the rest with static targets."""
    text = (DEPLOY / "k8s" / "monitoring" / "prometheus-k8s.yml").read_text()
    assert "kubernetes_sd_configs:\n      - role: endpoints" in text
    text = text.replace("kubernetes_sd_configs:\n      - role: endpoints", 'static_configs:\n      - targets: ["x:9400"]')
    text = text.replace("../../prometheus/rules.yaml", str(PROMETHEUS / "rules.yaml"))
    (tmp_path / "prometheus.yml").write_text(text)
    run(tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml"))


def test_every_alert_fires_in_its_promtool_unit_test():
    out = run(tool("promtool"), "test", "rules", "rules_test.yaml", cwd=PROMETHEUS)
    assert "SUCCESS" in out
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "rules_test.yaml").read_text()))
    rules = yaml.safe_load((PROMETHEUS / "rules.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert tested == alerts


def test_the_dashboards_promql_parses(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": as_promql(e)} for i, e in enumerate(dashboard_exprs())]}]}
    (tmp_path / "dashboard_rules.yaml").write_text(yaml.safe_dump(rules))
    run(tool("promtool"), "check", "rules", str(tmp_path / "dashboard_rules.yaml"))


def test_every_series_named_in_rules_and_dashboard_is_served_by_pdmesh():
    text = (PROMETHEUS / "rules.yaml").read_text() + "\n".join(dashboard_exprs())
    unknown = set(SERIES_NAME.findall(text)) - served_series()
    assert not unknown, f"no pdmesh service serves {sorted(unknown)}"


@pytest.mark.parametrize("needle", ["pdmesh_time_to_first_token_seconds_bucket", "pdmesh_inter_token_latency_seconds",
                                    "pdmesh_generation_tokens_total", "pdmesh_queue_depth", "pdmesh_rejections_total",
                                    "pdmesh_cluster_kv_usage_ratio", "pdmesh_kv_handoff_seconds_bucket",
                                    "pdmesh_kv_handoff_bytes_total", "pdmesh_cluster_prefill_backlog_tokens",
                                    "pdmesh_cluster_prefill_backlog_seconds", "pdmesh_cluster_worker_restarts_total"])
def test_the_dashboard_shows(needle):
    assert any(needle in e for e in dashboard_exprs())


def test_dashboard_panels_use_the_provisioned_datasource():
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in DASHBOARD["panels"]:
        assert panel["datasource"]["uid"] == uid and all(t["datasource"]["uid"] == uid for t in panel["targets"])
    dashboards = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "pdmesh.yaml").read_text())
    assert dashboards["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
