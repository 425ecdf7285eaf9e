"""deploy/compose: `docker-compose config` accepts it, and it agrees with the code and the other
deploy files (flags, env names, ports, mounted files, scalable workers)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from pdmesh.config import SchedulerConfig
from pdmesh.exporter.exporter_config import ExporterConfig
from pdmesh.worker.main import run_worker
from support.deploy_files import DEPLOY, ROOT, compose_config, flag_default, flags_in, known_env, known_flags

PDMESH_SERVICES = {"scheduler": "scheduler", "prefill": "prefill", "decode": "decode", "exporter": "exporter"}


@pytest.fixture(scope="module")
def config():
    return compose_config()


def test_every_role_and_the_monitoring_stack_is_there(config):
    assert set(config["services"]) == {*PDMESH_SERVICES, "model", "prometheus", "grafana"}


def test_env_names_and_flags_exist_in_the_cli(config):
    for name, command in PDMESH_SERVICES.items():
        service = config["services"][name]
        assert service["command"][0] == command
        env = set(service.get("environment", {}))
        assert env <= known_env(command), f"{name}: {env - known_env(command)}"
        assert flags_in(service["command"]) <= known_flags(command)


def test_ports_match_the_code_and_workers_scale(config):
    services = config["services"]
    scheduler = services["scheduler"]["environment"]
    assert int(scheduler["PDMESH_PORT"]) == SchedulerConfig().listen.port
    assert int(scheduler["PDMESH_INTERNAL_PORT"]) == flag_default("scheduler", "internal-port")
    assert int(scheduler["PDMESH_HTTP_PORT"]) == SchedulerConfig().http_port
    assert [p["target"] if isinstance(p, dict) else int(p.split(":")[-1]) for p in services["scheduler"]["ports"]] \
        == [SchedulerConfig().listen.port, SchedulerConfig().http_port]  # the internal port is not published
    assert int(services["exporter"]["environment"]["PDMESH_PORT"]) == ExporterConfig().port
    for role in ("prefill", "decode"):  # --scale: no fixed name, no host port
        assert "container_name" not in services[role] and "ports" not in services[role]
        assert services[role]["environment"]["PDMESH_SCHEDULER"] == f"scheduler:{scheduler['PDMESH_INTERNAL_PORT']}"
    assert services["exporter"]["environment"]["PDMESH_SCHEDULER"] == f"scheduler:{scheduler['PDMESH_PORT']}"


def test_mounted_files_exist_and_prometheus_scrapes_the_compose_ports(config):
    for name in ("prometheus", "grafana"):
        for volume in config["services"][name]["volumes"]:
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith("/"):
                assert Path(source).exists() and Path(source).is_relative_to(ROOT / "deploy"), source
    prometheus = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    assert f"scheduler:{config['services']['scheduler']['environment']['PDMESH_METRICS_PORT']}" in prometheus
    assert f"exporter:{ExporterConfig().port}" in prometheus


def test_services_build_the_cpu_image_and_drain_before_being_killed(config):
    for name in PDMESH_SERVICES:
        service = config["services"][name]
        assert service["build"]["dockerfile"] == "deploy/docker/Dockerfile.cpu"
        if name != "exporter":
            grace_s = int(service["stop_grace_period"].rstrip("s"))
            assert grace_s > inspect.signature(run_worker).parameters["grace_s"].default
            assert service["secrets"][0]["source"] == "cluster_secret"
