"""Shared fixtures for the tests against real servers.

A missing server skips these tests on a developer's machine but fails them when ``CI`` is
set: in CI the broker tests must run, never silently skip.
"""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

from integration.net import reachable

RABBITMQ_URL = os.environ.get("QTASKS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("QTASKS_TEST_NATS_URL", "nats://127.0.0.1:4222")


def _missing(message: str) -> None:
    """Skip on a developer's machine, fail in CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{message}; in CI broker tests must run", pytrace=False)
    pytest.skip(message)


def require_server(name: str, port: int) -> None:
    if not reachable(port):
        _missing(f"{name} is not reachable at 127.0.0.1:{port}")


def require_tools(*tools: str) -> None:
    """Commands a test runs (``openssl``, ``rabbitmq-server``) are on the PATH."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        _missing(f"needs {' and '.join(missing)}")


@pytest.fixture
def rabbitmq_url() -> str:
    require_server("RabbitMQ", 5672)
    return RABBITMQ_URL


@pytest.fixture
def nats_url() -> str:
    require_server("NATS", 4222)
    return NATS_URL


@pytest.fixture
def prefix() -> str:
    """A namespace no other test (or user) shares: every name a test creates starts so."""
    return f"qt{uuid.uuid4().hex[:10]}"
