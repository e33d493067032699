"""docker-compose.yml and the Dockerfile, checked with a real Compose parser.

No Docker engine runs here, so the stack is not started: `docker-compose config`
(Debian's docker-compose package, installed by .ci/run) parses and validates the
file, and the tests check that every command it runs exists in the repository.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess

import pytest
import yaml

from stack.processes import ROOT

SERVICES = {"sqs", "phrase-api", "worker", "flower", "enqueue"}

pytestmark = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose is not installed (apt-get install docker-compose; .ci/run does)",
)


def compose_config(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker-compose", "--project-directory", str(ROOT), "config"],
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
    )


def volume_target(volume: str | dict) -> str:
    """Return a volume's path in the container, from the short or the long syntax."""
    return volume["target"] if isinstance(volume, dict) else volume.split(":")[1]


def port_host(port: str | dict) -> str:
    """Return the host address a port is published on, from the short or the long syntax."""
    return port["host_ip"] if isinstance(port, dict) else port.split(":")[0]


@pytest.fixture(scope="module")
def config() -> dict:
    result = compose_config(INGEST_API_KEY="compose-test-key")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_has_every_service(config: dict) -> None:
    assert set(config["services"]) == SERVICES


def test_compose_requires_api_key() -> None:
    result = compose_config()
    assert result.returncode != 0
    assert "set INGEST_API_KEY in .env" in result.stderr


def test_compose_worker_scales(config: dict) -> None:
    worker = config["services"]["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker


def test_compose_waits_on_health(config: dict) -> None:
    services = config["services"]
    for name in ("sqs", "phrase-api", "worker", "flower"):
        assert services[name]["healthcheck"]["test"], name
    for dependency in ("sqs", "phrase-api"):
        assert services["worker"]["depends_on"][dependency]["condition"] == "service_healthy"
    assert services["enqueue"]["depends_on"]["sqs"]["condition"] == "service_healthy"


def test_compose_store_on_volume(config: dict) -> None:
    for name in ("worker", "enqueue"):
        targets = [volume_target(volume) for volume in config["services"][name]["volumes"]]
        assert "/app/var/store" in targets, name
    assert "store" in config["volumes"]


def test_compose_publishes_on_loopback_only(config: dict) -> None:
    for name, service in config["services"].items():
        for port in service.get("ports", []):
            assert port_host(port) == "127.0.0.1", name


def test_compose_commands_exist(config: dict) -> None:
    for name, service in config["services"].items():
        command = service["command"]
        if command[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(command[2]) is not None, f"{name}: {command[2]}"
        elif command[0] == "python":
            assert (ROOT / command[1]).is_file(), f"{name}: {command[1]}"
        else:
            assert command[:3] == ["celery", "-A", "tasks"], name
            assert (ROOT / "tasks" / "__init__.py").is_file()


def test_dockerfile_copies_existing_paths() -> None:
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
