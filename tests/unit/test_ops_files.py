"""Operations files: Prometheus alert rules and config, Grafana dashboard, OpenAPI, compose.

Nothing here runs a server. ``promtool`` (Debian package ``prometheus``; ``make test`` tries to
install it with ``infra/install-prometheus.sh``) checks the rules and config and parses every
dashboard expression; those tests are skipped with a reason where it is missing.
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

from streams.api import ROUTES, profile_document
from streams.metrics import Metrics
from tests.conftest import REPO

INFRA = REPO / "infra"
ALERTS = INFRA / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = INFRA / "prometheus" / "prometheus.yml"
DASHBOARD = INFRA / "grafana" / "dashboards" / "persona.json"
OPENAPI = INFRA / "openapi.yaml"
METRIC_TOKEN = re.compile(r"\bpersona_\w+")

REQUIRED_ALERTS = {
    "PersonaWorkerDown",
    "PersonaConsumerLagGrowing",
    "PersonaDeadLetterRateHigh",
    "PersonaNoTriggersWhileEventsFlow",
    "PersonaDriftAlarm",
    "PersonaRedisWriteErrors",
    "PersonaModelSnapshotTooOld",
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not on PATH (install Debian's 'prometheus' package, or run "
                    "infra/install-prometheus.sh)")  # fmt: skip
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, check=False
    )


def exported_series() -> set[str]:
    """Every series name a fresh ``Metrics`` can export, named as prometheus_client names them."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "gauge": ("",),
    }
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def metric_tokens(expression: str) -> set[str]:
    return set(METRIC_TOKEN.findall(expression))


def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


# -- Metrics -------------------------------------------------------------------------------------


def test_exported_series_match_the_exposition_text() -> None:
    """The names :func:`exported_series` derives are exactly the sample names a worker serves."""
    metrics = Metrics()
    for metric in vars(metrics).values():
        labelnames = getattr(metric, "_labelnames", None)
        if labelnames:
            metric.labels(*["x"] * len(labelnames))
    metrics.snapshot_loaded("lead", version=1, published_at=0.0)
    text = metrics.exposition().decode()
    samples = set(re.findall(r"^(persona_\w+)[{ ]", text, flags=re.MULTILINE))
    assert samples == exported_series()
    assert re.search(r"^persona_up 1\.0$", text, flags=re.MULTILINE)


# -- Prometheus ----------------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    spec = yaml.safe_load(ALERTS.read_text())
    return [rule for group in spec["groups"] for rule in group["rules"] if "alert" in rule]


def test_alert_rules_pass_promtool() -> None:
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_passes_promtool_and_loads_the_alert_rules() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    assert config["scrape_configs"][0]["job_name"] == "persona"
    result = run_promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_alert_rules_have_for_severity_annotations_and_known_metrics() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= REQUIRED_ALERTS
    series = exported_series()
    for rule in rules:
        name = rule["alert"]
        assert "for" in rule, f"{name}: no 'for'"
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["annotations"]["description"].strip(), name
        unknown = metric_tokens(rule["expr"]) - series
        assert not unknown, f"{name} uses metrics the engine does not export: {unknown}"


def render(template: str, labels: dict[str, str], value: str = "") -> str:
    """Prometheus' rendering of an annotation, for the few template forms alerts.yml uses."""
    text = re.sub(r"{{\s*\$labels\.(\w+)\s*}}", lambda m: labels[m.group(1)], template)
    return re.sub(r"{{\s*\$value[^}]*}}", value, text)


def test_alert_rules_fire_on_synthetic_series(tmp_path: Path) -> None:
    """``promtool test rules``: the key alerts fire when they should, and only then."""
    promtool()
    rules = {rule["alert"]: rule for rule in alert_rules()}
    base = 'job="persona", instance="w1:6066"'
    ok, dead = f'{base}, topic="c", outcome="ok"', f'{base}, topic="c", outcome="deadletter"'

    def expect(alert: str, labels: dict[str, str], value: str = "") -> dict[str, Any]:
        annotations = rules[alert]["annotations"]
        all_labels = {**labels, **rules[alert]["labels"]}
        return {
            "exp_labels": all_labels,
            "exp_annotations": {k: render(v, all_labels, value) for k, v in annotations.items()},
        }

    worker = {"job": "persona", "instance": "w1:6066"}
    spec = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": f"up{{{base}}}", "values": "1 1 0 0 0 0 0"},
                    {
                        "series": f"persona_events_total{{{ok}}}",
                        "values": "0+100x80",
                    },
                    {
                        "series": f"persona_events_total{{{dead}}}",
                        "values": "0+5x80",
                    },
                    {"series": f'persona_triggers_total{{{base}, kind="offer"}}', "values": "0x80"},
                    {
                        "series": f'persona_model_snapshot_age_seconds{{{base}, model="lead"}}',
                        "values": "60+60x80",
                    },
                    {  # 50 events a minute forced out of order from minute 20 to 30
                        "series": f"persona_ordering_forced_events_total{{{base}}}",
                        "values": "0x20 50+50x9 500x50",
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "1m", "alertname": "PersonaWorkerDown", "exp_alerts": []},
                    {
                        "eval_time": "6m",
                        "alertname": "PersonaWorkerDown",
                        "exp_alerts": [expect("PersonaWorkerDown", worker)],
                    },
                    {
                        "eval_time": "15m",
                        "alertname": "PersonaDeadLetterRateHigh",
                        "exp_alerts": [expect("PersonaDeadLetterRateHigh", {}, "4.762%")],
                    },
                    {
                        "eval_time": "80m",
                        "alertname": "PersonaNoTriggersWhileEventsFlow",
                        "exp_alerts": [expect("PersonaNoTriggersWhileEventsFlow", {})],
                    },
                    {
                        "eval_time": "15m",
                        "alertname": "PersonaEventsAppliedOutOfOrder",
                        "exp_alerts": [],
                    },
                    {
                        "eval_time": "25m",
                        "alertname": "PersonaEventsAppliedOutOfOrder",
                        "exp_alerts": [
                            expect("PersonaEventsAppliedOutOfOrder", {"instance": "w1:6066"}, "250")
                        ],
                    },
                    {
                        "eval_time": "60m",
                        "alertname": "PersonaEventsAppliedOutOfOrder",
                        "exp_alerts": [],
                    },
                    {
                        "eval_time": "40m",
                        "alertname": "PersonaModelSnapshotTooOld",
                        "exp_alerts": [],
                    },
                    {
                        "eval_time": "80m",
                        "alertname": "PersonaModelSnapshotTooOld",
                        "exp_alerts": [
                            expect("PersonaModelSnapshotTooOld", {"model": "lead"}, "1h 21m 0s")
                        ],
                    },
                ],
            },
            {  # the same traffic with triggers: nothing fires
                "interval": "1m",
                "input_series": [
                    {"series": f"up{{{base}}}", "values": "1x80"},
                    {"series": f"persona_events_total{{{ok}}}", "values": "0+100x80"},
                    {
                        "series": f'persona_triggers_total{{{base}, kind="offer"}}',
                        "values": "0+1x80",
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "80m", "alertname": name, "exp_alerts": []}
                    for name in sorted(REQUIRED_ALERTS)
                ],
            },
        ],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = run_promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# -- Grafana -------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return [p for p in panels if p.get("type") != "row"]


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, expression) of every target, and the template variable queries."""
    out = [(p["title"], t["expr"]) for p in dashboard_panels() for t in p.get("targets", [])]
    for variable in dashboard().get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        if query:
            out.append((f"variable {variable['name']}", query))
    return out


def test_dashboard_is_a_grafana_dashboard_on_the_prometheus_datasource() -> None:
    spec = dashboard()
    assert 36 <= spec["schemaVersion"] <= 41
    assert spec["uid"] and spec["title"]
    panels = dashboard_panels()
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus"
            assert target["expr"].strip()
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_uses_only_exported_metrics_and_covers_the_on_call_view() -> None:
    series = exported_series()
    used: set[str] = set()
    for title, expression in dashboard_expressions():
        tokens = metric_tokens(expression)
        unknown = tokens - series
        assert not unknown, f"panel {title!r} uses metrics the engine does not export: {unknown}"
        used |= tokens
    required = {
        "persona_events_total", "persona_events_by_type_total", "persona_consumer_lag",
        "persona_latency_seconds_bucket", "persona_deadletter_total", "persona_triggers_total",
        "persona_triggers_suppressed_total", "persona_lead_auc", "persona_lead_logloss",
        "persona_drift_alarms_total", "persona_offer_decisions_total",
        "persona_offer_conversions_total", "persona_segment_size",
        "persona_model_snapshot_version", "persona_model_snapshot_age_seconds",
        "persona_redis_write_seconds_bucket", "persona_redis_errors_total",
        "persona_watermark_seconds", "persona_up",
    }  # fmt: skip
    assert required <= used, f"dashboard lacks {sorted(required - used)}"


def test_dashboard_expressions_parse_as_promql(tmp_path: Path) -> None:
    """Each expression, with Grafana's variables filled in, as a recording rule for promtool."""
    promtool()
    rules = []
    for n, (_, expression) in enumerate(dashboard_expressions()):
        if expression.startswith("label_values("):
            continue
        expression = expression.replace("$__rate_interval", "1m").replace("$instance", ".*")
        rules.append({"record": f"dashboard:expr_{n}", "expr": expression})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_points_at_prometheus_and_the_mounted_dashboards() -> None:
    provisioning = INFRA / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["uid"] == "prometheus" and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "persona.yml").read_text())
    dashboard_path = providers["providers"][0]["options"]["path"]

    grafana = compose()["services"]["grafana"]
    assert grafana["image"] == "grafana/grafana:11.2.0"
    assert "3000:3000" in grafana["ports"]
    assert "healthcheck" in grafana
    assert "prometheus" in grafana["depends_on"]
    mounts = {}
    for volume in grafana["volumes"]:
        host, container = volume.split(":")[:2]
        assert (REPO / host).exists(), f"grafana mounts missing {host}"
        mounts[container] = (REPO / host).resolve()
    assert mounts["/etc/grafana/provisioning"] == provisioning.resolve()
    assert mounts[dashboard_path] == DASHBOARD.parent.resolve()


def test_prometheus_service_mounts_the_alert_rules_beside_its_config() -> None:
    prometheus = compose()["services"]["prometheus"]
    mounts = {}
    for volume in prometheus["volumes"]:
        host, container = volume.split(":")[:2]
        mounts[container] = (REPO / host).resolve()
    config_path = Path("/etc/prometheus/prometheus.yml")
    assert mounts[str(config_path)] == PROMETHEUS_CONFIG.resolve()
    for rule_file in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["rule_files"]:
        assert mounts[str(config_path.parent / rule_file)] == (ALERTS.parent / rule_file).resolve()


# -- OpenAPI -------------------------------------------------------------------------------------


def openapi() -> dict[str, Any]:
    return yaml.safe_load(OPENAPI.read_text())


def test_openapi_paths_equal_the_api_routes_and_each_has_a_200_schema() -> None:
    spec = openapi()
    assert spec["openapi"].startswith("3.1")
    assert set(spec["paths"]) == set(ROUTES)
    for path, item in spec["paths"].items():
        for parameter in re.findall(r"{(\w+)}", path):
            declared = [p["name"] for p in item["get"].get("parameters", []) if p["in"] == "path"]
            assert parameter in declared, f"{path}: path parameter {parameter} not declared"
        ok = item["get"]["responses"]["200"]
        (media,) = ok["content"].values()
        assert media["schema"], f"{path}: 200 without a schema"
    responses = {path: item["get"]["responses"] for path, item in spec["paths"].items()}
    assert "404" in responses["/v1/profiles/{user_id}"]
    assert "400" in responses["/v1/leads/top"]
    assert "503" in responses["/readyz"]


def test_profile_documents_validate_against_the_openapi_profile_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    referencing = pytest.importorskip("referencing")
    from referencing.jsonschema import DRAFT202012

    registry = referencing.Registry().with_resource(
        "urn:persona-api", referencing.Resource.from_contents(openapi(), DRAFT202012)
    )
    validator = jsonschema.Draft202012Validator(
        {"$ref": "urn:persona-api#/components/schemas/Profile"}, registry=registry
    )
    full = {
        "orders": "2", "revenue": "35.5", "cart_value": "12.0", "segment": "vip",
        "segment_reason": "orders >= 2", "cluster": "3", "lead_score": "0.71",
        "lead_explanation": '[{"feature": "recency_days", "contribution": 0.2}]',
        "lead_model_version": "4", "offer_id": "free-shipping", "offer_channel": "email",
        "offer_reason": "bandit", "offer_propensity": "0.4", "offer_policy": "linucb",
        "consent_email": "1", "consent_advertising": "0", "unsubscribed": "0",
        "updated_at": "2024-03-01T10:00:00.000Z",
    }  # fmt: skip
    for fields in (full, {}, {"orders": "1"}):
        validator.validate(profile_document("u-1", fields))


# -- install script ------------------------------------------------------------------------------


def test_install_script_is_executable_shell() -> None:
    script = INFRA / "install-prometheus.sh"
    assert os.access(script, os.X_OK)
    shell = shutil.which("sh") or "/bin/sh"
    result = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
