"""The docker-compose stack cannot run here (no Docker engine), so its files are validated."""

from __future__ import annotations

import re

import yaml

from streams.settings import SETTINGS
from tests.conftest import REPO


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_every_service_has_an_image_or_a_build_and_the_build_context_exists() -> None:
    services = compose()["services"]
    assert {"kafka", "redis", "worker-1", "worker-2", "simulator", "prometheus"} <= set(services)
    for name, service in services.items():
        assert ("image" in service) != ("build" in service), f"{name}: image xor build"
        if "build" in service:
            assert (REPO / service["build"] / "Dockerfile").is_file()


def test_published_ports_are_unique_and_dependencies_exist() -> None:
    services = compose()["services"]
    host_ports = [p.split(":")[0] for s in services.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports))
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if service["depends_on"][dependency].get("condition") == "service_healthy":
                assert "healthcheck" in services[dependency] or "build" in services[dependency]


def test_mounted_files_and_named_volumes_exist() -> None:
    spec = compose()
    for name, service in spec["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in spec["volumes"], f"{name} uses undeclared volume {source}"


def test_workers_are_configured_only_with_known_settings() -> None:
    known = {setting.env for setting in SETTINGS.values()}
    for name, service in compose()["services"].items():
        for variable in service.get("environment", {}):
            if variable.startswith("PERSONA_"):
                assert variable in known, f"{name} sets unknown {variable}"


def test_prometheus_scrapes_the_workers_metrics_port() -> None:
    config = yaml.safe_load((REPO / "infra" / "prometheus" / "prometheus.yml").read_text())
    targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
    services = compose()["services"]
    for target in targets:
        host, port = target.split(":")
        assert host in services
        assert any(re.fullmatch(rf"\d+:{port}", p) for p in services[host]["ports"])
