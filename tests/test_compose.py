"""The docker compose files validate and describe a deployment that scales.

Validation uses the compose client (``docker compose`` or ``docker-compose``); without
one the test skips, except in CI where ``scripts/test.sh`` installs it."""

from __future__ import annotations

import os
import re
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


@pytest.mark.parametrize(("file", "servers", "option"), [
    ("rabbitmq-cluster.yml", ["rabbitmq1", "rabbitmq2", "rabbitmq3"], "queue_type=quorum"),
    ("nats-cluster.yml", ["nats1", "nats2", "nats3"], "replicas=3"),
])
def test_cluster_files_name_every_node(file: str, servers: list[str], option: str) -> None:
    """Three servers, each healthy before any QTasks service starts; URLs naming all three
    (read by the backend as three hosts), with replicated queues or streams; workers
    with a healthcheck of their own."""
    config = compose_config(file)
    services = config["services"]
    assert set(services) == {*servers, "worker", "producer", "listener"}
    for server in servers:
        assert "healthcheck" in services[server]
    for name in ("worker", "producer", "listener"):
        service = services[name]
        assert "container_name" not in service and "ports" not in service
        assert {server: {"condition": "service_healthy"} for server in servers} \
            == service["depends_on"]
        url = service["environment"]["QTASKS_BROKER_URL"]
        assert url == service["environment"]["QTASKS_RESULTS_URL"] and option in url
        assert all(f"{server}:" in url for server in servers)
    url = services["worker"]["environment"]["QTASKS_BROKER_URL"]
    if url.startswith("amqp"):
        from qtasks.brokers.rabbitmq.settings import AmqpSettings

        assert len(AmqpSettings.parse(url, {}).hosts) == 3
    else:
        from qtasks.brokers.nats.settings import parse_url

        assert len(parse_url(url, {})[0]) == 3
    assert "healthcheck" in services["worker"]


@pytest.mark.parametrize("file", ["nats.yml", "nats-cluster.yml"])
def test_nats_servers_fsync_before_they_acknowledge(file: str) -> None:
    """``sync_interval: always`` in the JetStream block of the configuration file every
    NATS service runs with (the default syncs every two minutes: acknowledged writes can
    be lost in a crash of the host)."""
    services = compose_config(file)["services"]
    servers = [s for name, s in services.items() if name.startswith("nats")]
    assert servers
    for server in servers:
        conf = server["command"][server["command"].index("-c") + 1]
        mounted = {volume["target"]: volume["source"] for volume in server["volumes"]
                   if isinstance(volume, dict) and volume.get("type") == "bind"} \
            or {v.split(":")[1]: v.split(":")[0] for v in server["volumes"]
                if isinstance(v, str) and v.count(":") >= 1}
        text = Path(COMPOSE, mounted[conf]).read_text()
        jetstream = re.search(r"jetstream\s*\{([^}]*)\}", text)
        assert jetstream is not None and re.search(r"^\s*sync_interval:\s*always\s*$",
                                                   jetstream.group(1), re.MULTILINE)


def test_images_are_pinned_and_the_build_context_is_trimmed() -> None:
    """Every image (and the Dockerfile's base) names an exact version, so that a
    deployment does not change under a rebuild; .dockerignore keeps the virtual
    environment, git data and tests out of the build context."""
    for file in ("rabbitmq.yml", "nats.yml", "rabbitmq-cluster.yml", "nats-cluster.yml"):
        for name, service in compose_config(file)["services"].items():
            if "image" in service:
                assert re.search(r":\d+\.\d+\.\d+(-[a-z0-9.]+)?$", service["image"]), \
                    f"{file} {name}: {service['image']}"
    base = re.search(r"^FROM (\S+)", (COMPOSE / "Dockerfile").read_text(), re.MULTILINE)
    assert base is not None and re.search(r":\d+\.\d+\.\d+", base.group(1))
    ignored = (COMPOSE.parent / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests", "integration"} <= set(ignored)


def test_example_service_declares_its_tasks() -> None:
    from examples.service import app

    assert {"process_file", "checksum"} <= set(app.registry)
    assert app.registry["process_file"].generating
