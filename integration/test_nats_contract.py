"""The shared backend contract suite against a real NATS JetStream server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from brokers.nats import NatsBroker
from integration.nats_support import delete_namespace
from results.nats import NatsResultStore
from tests.contract import Backend, BackendContract


class TestNatsContract(BackendContract):
    @pytest.fixture
    async def backend(self, nats_url: str, prefix: str) -> AsyncIterator[Backend]:
        backend = Backend(broker=lambda: NatsBroker(nats_url, prefix=prefix),
                          results=lambda: NatsResultStore(nats_url, prefix=prefix))
        yield backend
        await backend.close()
        await delete_namespace(nats_url, prefix)
