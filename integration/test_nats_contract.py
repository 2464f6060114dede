"""The shared backend contract suite against a real NATS JetStream server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from integration.nats_support import open_backend
from tests.contract import Backend, BackendContract


class TestNatsContract(BackendContract):
    @pytest.fixture
    async def backend(self, nats_url: str, prefix: str) -> AsyncIterator[Backend]:
        async with open_backend(nats_url, prefix) as backend:
            yield backend
