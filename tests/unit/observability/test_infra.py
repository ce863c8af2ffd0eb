"""infra/: the Prometheus configuration, the alert rules and the Grafana dashboard are valid,
and name only series the services export. `promtool` (Debian's `prometheus` package, which
.ci/run installs where it can) runs the rules' unit tests; without it the rule file is held
to its schema."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cardctl.stack import service_ports
from shared.metrics import REGISTRY
from shared.settings import CardDeskSettings

ROOT = Path(__file__).resolve().parents[3]
PROMETHEUS = ROOT / "infra" / "prometheus"
GRAFANA = ROOT / "infra" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "carddesk.json"
ALERTS = ("CardDeskConsumerLagging", "CardDeskOutboxStuck", "CardDeskDeadLetter",
          "CardDeskServiceDown")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
            "gauge": ("",), "unknown": ("",)}

# The shape of a Prometheus rule file, as promtool reads it (alerting rules only here).
RULE_FILE_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["groups"], "additionalProperties": False,
    "properties": {"groups": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["name", "rules"], "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "interval": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
            "rules": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["alert", "expr"], "additionalProperties": False,
                "properties": {
                    "alert": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},
                    "expr": {"type": "string", "minLength": 1},
                    "for": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "annotations": {"type": "object",
                                    "additionalProperties": {"type": "string"}},
                }}}}}}},
}


def exported_series() -> set[str]:
    """Every sample name the registry's families can produce."""
    names = {"up"}
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def series_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(carddesk_[a-z0-9_]+|up)\b", expr))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(PROMETHEUS / "alerts.yml")["groups"]
            for rule in group["rules"]]


def test_the_alert_rules_have_the_rule_file_shape_and_the_four_alerts() -> None:
    jsonschema.validate(load_yaml(PROMETHEUS / "alerts.yml"), RULE_FILE_SCHEMA)
    assert [rule["alert"] for rule in alert_rules()] == list(ALERTS)


def test_the_schema_refuses_a_broken_rule() -> None:
    broken = {"groups": [{"name": "x", "rules": [{"alert": "No spaces allowed", "exp": "1"}]}]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, RULE_FILE_SCHEMA)


def test_the_alerts_and_their_tests_name_only_exported_series() -> None:
    exported = exported_series()
    for rule in alert_rules():
        assert series_in(rule["expr"]), rule["alert"]
        assert series_in(rule["expr"]) <= exported, rule["alert"]
    tests = load_yaml(PROMETHEUS / "alerts.test.yml")
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]}
    assert tested == set(ALERTS)
    for test in tests["tests"]:
        for series in test["input_series"]:
            assert series_in(series["series"]) <= exported, series["series"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_passes_the_alert_rules_unit_tests() -> None:
    result = subprocess.run(["promtool", "test", "rules", "alerts.test.yml"], cwd=PROMETHEUS,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_prometheus_configuration() -> None:
    result = subprocess.run(["promtool", "check", "config", "prometheus.yml"], cwd=PROMETHEUS,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_every_service_on_its_port() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    assert [PROMETHEUS / f for f in config["rule_files"]] == [PROMETHEUS / "alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = {group["labels"]["service"]: group["targets"] for group in job["static_configs"]}
    # The same ports the local stack gives them (default CARDDESK_HTTP_PORT 8080).
    ports = service_ports(CardDeskSettings(http_port=8080))
    assert targets == {name: [f"{name}:{port}"] for name, port in ports.items()}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def test_the_dashboard_reads_the_provisioned_data_source_and_exported_series() -> None:
    board, exported = dashboard(), exported_series()
    (source,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")[
        "datasources"]
    panels = board["panels"]
    assert board["uid"] and board["title"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert series_in(target["expr"]), target["expr"]
            assert series_in(target["expr"]) <= exported, target["expr"]


def test_the_dashboard_shows_throughput_latency_lag_outbox_and_dead_letters() -> None:
    shown = {name for panel in dashboard()["panels"] for target in panel["targets"]
             for name in series_in(target["expr"])}
    assert {"carddesk_commands_received_total", "carddesk_command_latency_seconds_bucket",
            "carddesk_consumer_lag_messages", "carddesk_outbox_unsent_rows",
            "carddesk_outbox_oldest_unsent_age_seconds", "carddesk_dlq_messages_total",
            "carddesk_projection_lag_seconds"} <= shown
    latency = [t["expr"] for p in dashboard()["panels"] for t in p["targets"]
               if "carddesk_command_latency_seconds_bucket" in t["expr"]]
    assert any("histogram_quantile(0.99" in e for e in latency)
    assert any("histogram_quantile(0.5" in e for e in latency)


def test_grafana_loads_the_dashboards_folder_the_compose_file_mounts() -> None:
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "carddesk.yml")[
        "providers"]
    compose = load_yaml(ROOT / "docker-compose.yml")
    grafana, prometheus = compose["services"]["grafana"], compose["services"]["prometheus"]
    assert grafana["image"].startswith("grafana/grafana:")
    assert prometheus["image"].startswith("prom/prometheus:")
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./infra/grafana/dashboards"] == provider["options"]["path"]
    assert "./infra/prometheus" in {v.split(":")[0] for v in prometheus["volumes"]}
    for host in (*mounts, "./infra/prometheus"):
        assert (ROOT / host).is_dir(), host
    assert "GF_SECURITY_ADMIN_PASSWORD" in grafana["environment"]
