"""Reads of the RabbitMQ result stream asked at the same time share one pass
(``results/rabbitmq/reads.py``), and each still sees what was published before it asked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from integration.rabbitmq_support import delete_namespace
from qtasks.protocol import ResultEvent, encode, uuid7
from qtasks.results.rabbitmq import RabbitMQResultStore


@pytest.fixture
async def store(rabbitmq_url: str, prefix: str) -> AsyncIterator[RabbitMQResultStore]:
    store = RabbitMQResultStore(rabbitmq_url, prefix=prefix)
    await store.start()
    yield store
    await store.close()
    await delete_namespace(rabbitmq_url, prefix)


def final(task_id: str, returning: Any) -> ResultEvent:
    now = time.time()
    return ResultEvent(kind="final", id=task_id, task="t", status="success",
                       returning=returning, ts=now, finished_at=now, created_at=now)


async def test_fifty_reads_at_once_take_few_passes(store: RabbitMQResultStore) -> None:
    ids = [uuid7() for _ in range(50)]
    for i, task_id in enumerate(ids):
        event = final(task_id, i)
        await store.publish(event, encode(event))
    passes = 0
    retrying = store.replay.retrying

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal passes
        passes += 1
        return retrying(*args, **kwargs)

    store.replay.retrying = counted  # type: ignore[method-assign]
    async with asyncio.timeout(30):
        found = await asyncio.gather(*(store.get(task_id) for task_id in ids))
        history = await asyncio.gather(*(store.history(task_id) for task_id in ids[:5]))
    assert [event.returning for event in found if event is not None] == list(range(50))
    assert [[e.returning for e in events] for events in history] == [[0], [1], [2], [3], [4]]
    assert passes <= 4  # the first read alone, then the rest together (twice)


async def test_a_read_asked_during_a_pass_sees_what_was_published_after_it_began(
        store: RabbitMQResultStore) -> None:
    early, late = uuid7(), uuid7()
    event = final(early, "early")
    await store.publish(event, encode(event))
    began = asyncio.Event()
    retrying = store.replay.retrying

    def spied(*args: Any, **kwargs: Any) -> Any:
        began.set()
        return retrying(*args, **kwargs)

    store.replay.retrying = spied  # type: ignore[method-assign]
    first = asyncio.create_task(store.get(early))
    async with asyncio.timeout(30):
        await began.wait()  # the pass for ``first`` is under way
    event = final(late, "late")
    await store.publish(event, encode(event))
    async with asyncio.timeout(30):
        got_late = await store.get(late)
        got_early = await first
    assert got_early is not None and got_early.returning == "early"
    assert got_late is not None and got_late.returning == "late"
