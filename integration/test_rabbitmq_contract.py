"""The backend contract suite, unchanged, against a real RabbitMQ."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from integration.rabbitmq_support import delete_namespace
from qtasks.brokers.rabbitmq import RabbitMQBroker
from qtasks.results.rabbitmq import RabbitMQResultStore
from tests.contract import Backend, BackendContract


class TestRabbitMQContract(BackendContract):
    @pytest.fixture
    async def backend(self, rabbitmq_url: str, prefix: str) -> AsyncIterator[Backend]:
        backend = Backend(broker=lambda: RabbitMQBroker(rabbitmq_url, prefix=prefix),
                          results=lambda: RabbitMQResultStore(rabbitmq_url, prefix=prefix))
        yield backend
        await backend.close()
        await delete_namespace(rabbitmq_url, prefix)


class TestRabbitMQQuorumContract(BackendContract):
    """The same contract on quorum queues (replicated; no priorities on 3.10)."""

    @pytest.fixture
    async def backend(self, rabbitmq_url: str, prefix: str) -> AsyncIterator[Backend]:
        backend = Backend(
            broker=lambda: RabbitMQBroker(rabbitmq_url, prefix=prefix, queue_type="quorum"),
            results=lambda: RabbitMQResultStore(rabbitmq_url, prefix=prefix))
        yield backend
        await backend.close()
        await delete_namespace(rabbitmq_url, prefix)
