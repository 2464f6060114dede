"""The backend contract on the embedded memory backends."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from qtasks.brokers.memory import MemoryBroker
from qtasks.results.memory import MemoryResultStore
from tests.contract import Backend, BackendContract


class TestMemoryContract(BackendContract):
    @pytest.fixture
    async def backend(self) -> AsyncIterator[Backend]:
        url = f"memory://{uuid.uuid4().hex}"
        backend = Backend(broker=lambda: MemoryBroker(url), results=lambda: MemoryResultStore(url))
        yield backend
        await backend.close()
