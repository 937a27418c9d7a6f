"""docker-compose.yml validates with the compose tool CI installs (Debian's docker-compose 1.29;
``docker compose`` v2 when that is what is here) and describes the scale-out topology.

No Docker engine is needed: ``config`` only parses, interpolates and validates the file. With
``SPECTRAWATCH_CI=1`` a missing tool fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"


def compose_command() -> list[str]:
    """``docker-compose`` (v1, Debian) or ``docker compose`` (v2 plugin); fails in CI if none."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    message = "no docker-compose / docker compose: apt-get install docker-compose"
    if os.environ.get("SPECTRAWATCH_CI") == "1":
        pytest.fail(f"{message} (SPECTRAWATCH_CI=1: .ci/run installs it)")
    pytest.skip(message)


def compose(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the compose tool on docker-compose.yml with only ``env`` of the SPECTRAWATCH_ vars."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPECTRAWATCH_")}
    return subprocess.run(
        [*compose_command(), "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        cwd=ROOT,
        timeout=120,
    )


def test_compose_config_validates() -> None:
    result = compose("config", "-q", SPECTRAWATCH_DB_PASSWORD="secret")
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_run_without_a_database_password() -> None:
    result = compose("config", "-q")
    assert result.returncode != 0
    assert "set SPECTRAWATCH_DB_PASSWORD" in result.stderr


def test_compose_topology_is_configured_by_environment() -> None:
    result = compose(
        "config",
        SPECTRAWATCH_DB_PASSWORD="pw 1",
        SPECTRAWATCH_GPU_WORKERS="4",
        SPECTRAWATCH_PORT="9000",
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    services = config["services"]
    assert {"db", "api", "worker"} <= set(services)
    api, worker = services["api"], services["worker"]
    for service in (api, worker):
        env = service["environment"]
        assert env["SPECTRAWATCH_QUEUE"] == "procrastinate"
        assert env["SPECTRAWATCH_DATABASE_URL"] == (
            "postgresql+psycopg://spectrawatch:pw 1@db:5432/spectrawatch"
        )
    assert "--no-worker" in api["command"]  # jobs run in the worker service only
    assert api["environment"]["SPECTRAWATCH_REQUIRE_AUTH"] == "true"
    ((published, target),) = [(int(p["published"]), int(p["target"])) for p in api["ports"]]
    assert (published, target) == (9000, 8765)
    assert int(worker["deploy"]["replicas"]) == 4
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert worker["command"][:3] == ["worker", "--device", "cuda:0"]
    assert "healthcheck" in services["db"]
    assert "healthcheck" in api


def test_every_spectrawatch_image_is_built_by_its_own_service() -> None:
    """``worker-cpu`` reused the api's image without a build section, so compose could try to
    pull ``spectrawatch:latest-cpu`` (no such public image) when it created that service first."""
    result = compose("--profile", "cpu", "config", SPECTRAWATCH_DB_PASSWORD="pw")
    assert result.returncode == 0, result.stderr
    services: dict[str, Any] = yaml.safe_load(result.stdout)["services"]
    ours = {name: s for name, s in services.items() if s["image"].startswith("spectrawatch:")}
    assert {"api", "worker", "worker-cpu"} <= set(ours)
    for name, service in ours.items():
        variant = service["image"].rpartition("-")[2]
        assert service["build"]["args"]["VARIANT"] == variant, name
