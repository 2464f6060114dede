"""The backend contract suite with the broker of one server and the result store of the
other: RabbitMQ tasks with NATS results, and NATS tasks with RabbitMQ results."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from integration import nats_support, rabbitmq_support
from qtasks.brokers.nats import NatsBroker
from qtasks.brokers.rabbitmq import RabbitMQBroker
from qtasks.results.nats import NatsResultStore
from qtasks.results.rabbitmq import RabbitMQResultStore
from tests.contract import Backend, BackendContract


class TestRabbitMQBrokerNatsResults(BackendContract):
    @pytest.fixture
    async def backend(self, rabbitmq_url: str, nats_url: str,
                      prefix: str) -> AsyncIterator[Backend]:
        backend = Backend(broker=lambda: RabbitMQBroker(rabbitmq_url, prefix=prefix),
                          results=lambda: NatsResultStore(nats_url, prefix=prefix))
        yield backend
        await backend.close()
        try:
            await rabbitmq_support.delete_namespace(rabbitmq_url, prefix)
        finally:
            await nats_support.delete_namespace(nats_url, prefix)


class TestNatsBrokerRabbitMQResults(BackendContract):
    @pytest.fixture
    async def backend(self, rabbitmq_url: str, nats_url: str,
                      prefix: str) -> AsyncIterator[Backend]:
        backend = Backend(broker=lambda: NatsBroker(nats_url, prefix=prefix),
                          results=lambda: RabbitMQResultStore(rabbitmq_url, prefix=prefix))
        yield backend
        await backend.close()
        try:
            await nats_support.delete_namespace(nats_url, prefix)
        finally:
            await rabbitmq_support.delete_namespace(rabbitmq_url, prefix)
