"""RabbitMQ over TLS (``amqps://``) against a node of its own with a TLS listener that
requires a client certificate: tasks and results both ways, the server's certificate
verified by default, and a client without a certificate refused."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest

from integration.conftest import require_tools
from integration.tls_support import TlsNode, private_rabbitmq_tls
from qtasks import BrokerUnavailableError, QueueTasks, TaskStatus
from tests.contract import running_worker

DEADLINE = 30.0
#: The module fixture boots a RabbitMQ node of its own (up to 120 s) before the first test.
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def node() -> Iterator[TlsNode]:
    require_tools("rabbitmq-server", "openssl")
    with private_rabbitmq_tls() as started:
        yield started


def url(node: TlsNode, **options: str) -> str:
    return f"amqps://guest:guest@127.0.0.1:{node.tls_port}/?{urlencode(options)}"


async def test_tasks_and_results_over_mutual_tls(node: TlsNode) -> None:
    certs = node.certs
    secure = url(node, cafile=certs.ca, certfile=certs.client_cert,
                 keyfile=certs.client_key, prefix="tls")
    app = QueueTasks(broker=secure, results=secure, embedded_worker=False)

    @app.task
    async def count(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i

    try:
        async with running_worker(app):
            task = await count.add_task(3)
            async with asyncio.timeout(DEADLINE):
                streamed = [v async for v in task.stream()]
            done = await task.wait(DEADLINE)
    finally:
        await app.close()
    assert streamed == [0, 1, 2]
    assert (done.status, done.returning) == (TaskStatus.SUCCESS, [0, 1, 2])


async def test_the_server_certificate_is_verified_by_default(node: TlsNode) -> None:
    """No ``cafile``: the system CAs do not know the test CA, so the connection fails,
    with an error that names the broker and not the password."""
    certs = node.certs
    app = QueueTasks(broker=url(node, certfile=certs.client_cert, keyfile=certs.client_key,
                                connect_timeout="2"), embedded_worker=False)
    try:
        with pytest.raises(BrokerUnavailableError) as raised:
            await app.start()
    finally:
        await app.close()
    message = str(raised.value)
    assert "certificate verify failed" in message
    assert f"127.0.0.1:{node.tls_port}" in message and ":guest@" not in message


async def test_a_client_without_a_certificate_is_refused(node: TlsNode) -> None:
    app = QueueTasks(broker=url(node, cafile=node.certs.ca, connect_timeout="2"),
                     embedded_worker=False)
    try:
        with pytest.raises(BrokerUnavailableError):
            await app.start()
    finally:
        await app.close()
