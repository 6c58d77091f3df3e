"""Integration: a real Prometheus server scrapes a real worker; worker logs carry no PII.

The PII test runs its worker at debug level, the most a log can say, and scans every line.

The Prometheus test needs the ``prometheus`` binary (Debian package ``prometheus``; ``make test``
tries ``infra/install-prometheus.sh``) and is skipped with a reason without it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from connectors.embedded import free_port, spawn, stop_process_group
from connectors.kafka import produce_all
from connectors.redis_cache import profile_key
from connectors.segment import partition_key, route
from streams.settings import Settings
from streams.worker import WorkerProcess
from tests.conftest import REPO, engine_settings, wait_until

pytestmark = pytest.mark.integration

ALERTS = REPO / "infra" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "infra" / "grafana" / "dashboards" / "persona.json"
JOB = "persona-it"

EMAIL = "jane.doe@example.com"
NAME = "Jane Doe"
PHONE = "+1 415 555 0132"
PHONE_DIGITS = "4155550132"


# -- small helpers (the same shape as tests/integration/test_ingest.py) ---------------------------


def event(
    user: str, event_name: str, message_id: str, ts: str, **properties: Any
) -> dict[str, Any]:
    return {
        "type": "track",
        "event": event_name,
        "userId": user,
        "messageId": message_id,
        "timestamp": ts,
        "properties": properties,
        "context": {"consent": {"categoryPreferences": {"email": True, "advertising": False}}},
    }


def routed(settings: Settings, payload: dict[str, Any]) -> tuple[str, bytes, bytes]:
    return settings.input_topics[route(payload)], partition_key(payload), orjson.dumps(payload)


def send(settings: Settings, items: list[tuple[str, bytes | None, bytes]]) -> None:
    asyncio.run(produce_all(settings.broker_url, items))


def worker_counts(worker: WorkerProcess) -> dict[str, float]:
    """``persona_events_total`` of the worker by outcome, summed over topics, from /metrics."""
    text = worker.scrape() or ""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "persona_events":
            for sample in family.samples:
                if sample.name == "persona_events_total":
                    outcome = sample.labels["outcome"]
                    counts[outcome] = counts.get(outcome, 0.0) + sample.value
    return counts


# -- a real Prometheus server ---------------------------------------------------------------------


class Prometheus:
    """``prometheus`` on a free loopback port, scraping one worker every second."""

    def __init__(self, directory: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / "prometheus.log"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": [target]}],
                }
            ],
        }
        config_path = directory / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.command = [
            shutil.which("prometheus") or "prometheus",
            f"--config.file={config_path}",
            f"--storage.tsdb.path={directory / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        self.proc = spawn(self.command, self.log_path)

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            return json.loads(error.read() or b"{}")
        except OSError:
            return None

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def query(self, expression: str) -> list[dict[str, Any]] | None:
        """The instant vector of ``expression``; None while the server does not answer."""
        body = self.get("/api/v1/query", query=expression)
        if not body:
            return None
        assert body.get("status") == "success", f"{expression}: {body}"
        return body["data"]["result"]

    def values(self, expression: str, label: str) -> dict[str, float]:
        """``label`` value → sample value of the instant vector of ``expression``."""
        return {
            r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expression) or []
        }

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        stop_process_group(self.proc)


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    if shutil.which("prometheus") is None:
        pytest.skip(
            "prometheus not on PATH (Debian package 'prometheus'; infra/install-prometheus.sh "
            "installs it where it can)"
        )
    servers: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        directory = tmp_path / f"prometheus-{len(servers)}"
        directory.mkdir()
        server = Prometheus(directory, target)
        servers.append(server)
        wait_until(server.ready, timeout=30, what="prometheus /-/ready")
        return server

    yield start
    for server in servers:
        server.stop()


def test_prometheus_scrapes_the_engine_series(
    broker, redis_server, tmp_path, start_worker, start_prometheus
) -> None:
    settings = engine_settings(broker, redis_server, tmp_path)
    worker = start_worker(settings)

    user = "prom-ann"
    good = [
        event(user, "Product Viewed", "p1", "2024-03-01T10:00:00Z", product_id="x", price=3.0),
        event(user, "Product Added", "p2", "2024-03-01T10:01:00Z", product_id="x", price=3.0),
        event(user, "Order Completed", "p3", "2024-03-01T10:02:00Z", order_id="o1", revenue=3.0),
    ]
    clickstream = settings.input_topics["clickstream"]
    no_id = orjson.dumps(event(user, "Product Viewed", "", "2024-03-01T10:03:00Z"))
    bad = [
        (clickstream, user.encode(), b"not json"),
        (clickstream, user.encode(), b"{broken"),
        (clickstream, user.encode(), no_id),
    ]
    send(settings, [routed(settings, e) for e in good] + bad)
    wait_until(
        lambda: worker_counts(worker) == {"ok": 3.0, "deadletter": 3.0},
        what="the worker to count 3 ok and 3 dead-lettered events",
    )

    target = f"{settings.web_host}:{settings.web_port}"
    prometheus = start_prometheus(target)
    selector = f'{{job="{JOB}"}}'

    def scraped() -> bool:
        return prometheus.values(f"up{selector}", "job").get(JOB) == 1.0 and bool(
            prometheus.query(f"persona_events_total{selector}")
        )

    wait_until(
        scraped,
        timeout=45,
        what=f"prometheus at {prometheus.url} to scrape {target} "
        f"(log: {prometheus.log_path}; worker log: {worker.log_path})",
    )

    by_outcome = prometheus.values(f"sum by (outcome) (persona_events_total{selector})", "outcome")
    assert by_outcome == {"ok": 3.0, "deadletter": 3.0}
    by_reason = prometheus.values(f"sum by (reason) (persona_deadletter_total{selector})", "reason")
    assert by_reason == {"not_json": 2.0, "missing_message_id": 1.0}
    by_type = prometheus.values(
        f'sum by (type) (persona_events_by_type_total{{job="{JOB}", outcome="ok"}})', "type"
    )
    assert by_type == {"Product Viewed": 1.0, "Product Added": 1.0, "Order Completed": 1.0}
    assert prometheus.query(f"up{selector} == 1"), "up of the worker's job is not 1"
    assert prometheus.query(f"persona_batch_seconds_count{selector} > 0")
    assert prometheus.values(f"persona_up{selector}", "job") == {JOB: 1.0}
    # user ids never become label values
    series = prometheus.get("/api/v1/series", **{"match[]": f'{{job="{JOB}"}}'})
    assert series and series["status"] == "success"
    assert user not in json.dumps(series["data"])

    # the alert rules load and evaluate without errors on live data
    def rules_evaluated() -> list[dict[str, Any]] | None:
        body = prometheus.get("/api/v1/rules")
        groups = body["data"]["groups"] if body else []
        rules = [rule for group in groups for rule in group["rules"]]
        # a rule never evaluated reports lastEvaluation 0001-01-01T00:00:00Z
        evaluated = rules and all(r.get("lastEvaluation", "0").startswith("2") for r in rules)
        return rules if evaluated else None

    rules = wait_until(rules_evaluated, timeout=20, what="the alert rules to be evaluated")
    unhealthy = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not unhealthy, f"alert rules failing on live data: {unhealthy}"
    firing = {r["name"] for r in rules if r["state"] == "firing"}
    assert "PersonaWorkerDown" not in firing

    # every dashboard expression runs on the live server
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target_ in panel.get("targets", []):
            expression = target_["expr"].replace("$__rate_interval", "1m")
            expression = expression.replace("$instance", ".*")
            prometheus.query(expression)  # asserts status == success


def test_worker_logs_and_cache_carry_no_pii(broker, redis_server, tmp_path, start_worker) -> None:
    settings = engine_settings(broker, redis_server, tmp_path, log_level="debug")
    worker = start_worker(settings)
    user = "pii-jane"
    pii = {"email": EMAIL, "name": NAME, "phone": PHONE}
    consent = {"categoryPreferences": {"email": True, "advertising": True}}
    identify = {
        "type": "identify",
        "userId": user,
        "messageId": "pii-1",
        "timestamp": "2024-03-01T10:00:00Z",
        "traits": {**pii, "first_name": "Jane", "last_name": "Doe"},
        "context": {"consent": consent, "traits": pii},
    }
    viewed = {
        **event(user, "Product Viewed", "pii-2", "2024-03-01T10:01:00Z", product_id="p1", **pii),
        "context": {"consent": consent, "traits": pii},
    }
    ordered = event(
        user, "Order Completed", "pii-3", "2024-03-01T10:02:00Z", revenue=12.0, contact=pii
    )
    bad_timestamp = {**viewed, "messageId": "pii-4", "timestamp": f"{EMAIL} {PHONE}"}
    bad_type = {**viewed, "messageId": "pii-5", "type": f"{NAME} <{EMAIL}>"}
    clickstream = settings.input_topics["clickstream"]
    items = [routed(settings, e) for e in (identify, viewed, ordered)]
    items += [
        routed(settings, bad_timestamp),
        (clickstream, user.encode(), orjson.dumps(bad_type)),
        (clickstream, user.encode(), f'{{"email": "{EMAIL}", "name": "{NAME}"'.encode()),
        (clickstream, user.encode(), f"{NAME} {PHONE} {EMAIL}".encode() + b"\xff"),
    ]
    send(settings, items)
    wait_until(
        lambda: worker_counts(worker) == {"ok": 3.0, "deadletter": 4.0},
        what="the worker to count 3 ok and 4 dead-lettered events",
    )

    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        stored = client.hgetall(profile_key(user))
    finally:
        client.close()
    assert stored.get("events") == "3"

    time.sleep(0.5)  # let the worker finish logging the last batch
    worker.stop()
    log = worker.log_path.read_text(errors="replace")
    lines = [line for line in log.splitlines() if line.strip()]
    assert lines, "the worker wrote no log at all"
    for line in lines:
        if line.startswith("{"):
            json.loads(line)  # the structured log stays JSON lines
    leaks = {
        needle: [line for line in lines if needle.lower() in line.lower()]
        for needle in (EMAIL, NAME, PHONE, PHONE_DIGITS, "jane.doe")
    }
    assert not any(leaks.values()), (
        f"PII in the worker log: { {k: v for k, v in leaks.items() if v} }"
    )
    cached = json.dumps(stored)
    for needle in (EMAIL, NAME, PHONE, "Jane"):
        assert needle not in cached, f"{needle!r} stored in Redis: {stored}"
