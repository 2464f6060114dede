"""The docker compose files validate and describe a deployment that scales.

Validation uses the compose client (``docker compose`` or ``docker-compose``); without
one the test skips, except in CI where ``scripts/test.sh`` installs it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parent.parent / "compose"


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def compose_config(file: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``docker compose -f FILE config``, parsed: the file as the client resolves it
    (anchors, interpolation from ``env``). Skips without a client, fails so in CI."""
    command = compose_command()
    if command is None:
        if os.environ.get("CI"):
            pytest.fail("no docker compose client in CI")
        pytest.skip("no docker compose client")
    result = subprocess.run([*command, "-f", str(COMPOSE / file), "config"], cwd=COMPOSE,
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("file", "broker"), [("rabbitmq.yml", "rabbitmq"), ("nats.yml", "nats")])
def test_compose_file_is_valid_and_scalable(file: str, broker: str) -> None:
    config = compose_config(file)
    services = config["services"]
    assert set(services) == {broker, "worker", "producer", "listener"}
    assert "healthcheck" in services[broker]
    assert config["volumes"]
    for name in ("worker", "producer", "listener"):
        service = services[name]
        # --scale needs no fixed container name and no published port.
        assert "container_name" not in service and "ports" not in service
        assert service["depends_on"][broker]["condition"] == "service_healthy"
        assert f"@{broker}:" in service["environment"]["QTASKS_BROKER_URL"] or \
            f"//{broker}:" in service["environment"]["QTASKS_BROKER_URL"]
    assert services["worker"]["command"][:3] == ["qtasks", "worker", "examples.service:app"]
    assert services["listener"]["command"] == ["qtasks", "listen", "*"]


def test_example_service_declares_its_tasks() -> None:
    from examples.service import app

    assert {"process_file", "checksum"} <= set(app.registry)
    assert app.registry["process_file"].generating
