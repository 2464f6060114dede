"""What the contract's tests share: the ``Backend`` a backend's test module provides, a
worker running in the test's process, an iterator drained in the background, and bounded
waits for what a worker or a broker does a moment later."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from qtasks import Broker, QueueTasks, ResultStore, Task, TaskMessage, TaskStatus, Worker
from qtasks.interfaces import DeadLetter, close_iterator
from qtasks.protocol import ResultEvent, encode, uuid7
from tests.contract.tasks import register_contract_tasks

#: Upper bound for any single wait in these tests: a hang fails, it does not stall CI.
DEADLINE = 20.0


class Backend:
    """Fresh connections into one namespace; remembers every app to close it."""

    def __init__(self, broker: Callable[[], Broker], results: Callable[[], ResultStore]) -> None:
        self.make_broker = broker
        self.make_results = results
        self.apps: list[QueueTasks] = []

    def app(self, **options: Any) -> QueueTasks:
        app = QueueTasks(broker=self.make_broker(), results=self.make_results(),
                         embedded_worker=False, **options)
        register_contract_tasks(app)
        self.apps.append(app)
        return app

    async def close(self) -> None:
        for app in self.apps:
            with contextlib.suppress(Exception):
                await app.close()


@contextlib.asynccontextmanager
async def running_worker(app: QueueTasks, **options: Any) -> AsyncIterator[Worker]:
    worker = Worker(app, **options)
    run = asyncio.create_task(worker.run())
    async with asyncio.timeout(DEADLINE):
        started = asyncio.create_task(worker.wait_started())
        await asyncio.wait({run, started}, return_when=asyncio.FIRST_COMPLETED)
        if run.done():
            started.cancel()
            run.result()
    try:
        yield worker
    finally:
        worker.stop()
        async with asyncio.timeout(DEADLINE + worker.grace):
            await run


class Drain:
    """Reads an async iterator in a background task into a queue.

    Cancelling ``anext()`` on an async generator closes the generator, so a test that
    wants to see "nothing arrives for a while" cannot time out a pending ``anext``; it
    waits on this queue instead."""

    def __init__(self, iterator: AsyncIterator[Any]) -> None:
        self.iterator = iterator
        self.items: asyncio.Queue[Any] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for item in self.iterator:
            await self.items.put(item)

    async def next(self, timeout: float = DEADLINE) -> Any:
        getter = asyncio.ensure_future(self.items.get())
        done, _ = await asyncio.wait({getter, self.reader}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        if self.reader in done:
            self.reader.result()
            raise AssertionError("the iterator ended")
        raise AssertionError(f"nothing arrived within {timeout} s")

    async def nothing_within(self, timeout: float) -> bool:
        """True if nothing arrives for ``timeout`` seconds (a bounded negative check)."""
        try:
            item = await self.next(timeout)
        except AssertionError:
            return True
        await self.items.put(item)
        return False

    async def close(self) -> None:
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        await close_iterator(self.iterator)


def task_message(queue: str, priority: int = 0, not_before: float | None = None,
                 name: str = "add") -> tuple[TaskMessage, bytes]:
    message = TaskMessage(id=uuid7(), task=name, args=[1, 2], queue=queue, priority=priority,
                          created_at=time.time(), not_before=not_before)
    return message, encode(message)


async def publish_one(app: QueueTasks, queue: str) -> bytes:
    """Start ``app``, declare ``queue`` and publish one task on it; its body."""
    await app.start()
    await app.broker.declare([queue])
    message, body = task_message(queue)
    await app.broker.publish(message, body)
    return body


async def check_copies_join_the_run(
        app: QueueTasks, copies: int, caplog: pytest.LogCaptureFixture,
        meanwhile: Callable[[], Awaitable[None]] | None = None, quiet: float = 0.5) -> None:
    """The scenario of a lost lease, on a broker set up to lose it (a short RabbitMQ
    ``consumer_timeout``, NATS without heartbeats): a held task's message comes back to
    its worker ``copies`` times, each copy joins the run (``meanwhile`` runs then), and
    once released it has run once, ended once, and left nothing to deliver for ``quiet``
    seconds."""
    calls: list[int] = []
    release = asyncio.Event()

    @app.task
    async def long_held() -> int:
        calls.append(1)
        await release.wait()
        return len(calls)

    with caplog.at_level(logging.WARNING):
        async with running_worker(app, concurrency=2) as worker:
            task = await long_held.add_task()
            async with asyncio.timeout(DEADLINE):
                while worker.processed < copies:  # noqa: ASYNC110 - no event for it
                    await asyncio.sleep(0.02)  # the copies joined; bounded
            assert "delivered again while it is handled here" in caplog.text
            if meanwhile is not None:
                await meanwhile()
            assert not task.status.finished
            release.set()
            await task.wait(DEADLINE)
    assert (task.status, task.returning, len(calls)) == (TaskStatus.SUCCESS, 1, 1)
    deliveries = Drain(app.broker.consume(["default"], prefetch=2))
    try:
        assert await deliveries.nothing_within(quiet)
    finally:
        await deliveries.close()


async def kept_dead_letters(app: QueueTasks, count: int) -> list[DeadLetter]:
    """The namespace's dead letters once there are ``count`` (a broker may file them a
    moment after the settle returned)."""
    async with asyncio.timeout(DEADLINE):
        while len(letters := await app.broker.dead_letters()) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return letters


async def three_readers(task: Task, reader: QueueTasks, listener: Drain,
                        count: int) -> tuple[list[Any], list[Any], list[Any]]:
    """The partial values of ``task`` as its submitter's ``stream()``, a late reader's
    ``stream()`` by id, and a listener subscribed before it ran each saw them."""
    async with asyncio.timeout(DEADLINE):
        live = [v async for v in task.stream()]
        late = [v async for v in reader.task_handle(task.id).stream()]
        listened = []
        while len(listened) < count:
            event = await listener.next()
            if event.kind == "partial":
                listened.append(event.value)
    await listener.close()
    return live, late, listened


async def settled(worker: Worker, count: int) -> None:
    """Until ``worker`` has settled ``count`` deliveries (bounded)."""
    async with asyncio.timeout(DEADLINE):
        while worker.processed < count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # the worker has no event for it; bounded


async def heard_cancel(worker: Worker, task_id: str) -> None:
    """Until ``worker`` has heard the cancel request for ``task_id`` (bounded)."""
    async with asyncio.timeout(DEADLINE):
        while worker.revoked.reason(task_id) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # the worker has no event for it; bounded


async def redeliver_with_final(app: QueueTasks, task_id: str, task: str, returning: Any,
                               store: Callable[[ResultEvent], Any] | None = None) -> None:
    """Make the next delivery of the queued task ``task_id`` a redelivery whose final is
    already stored (what a worker killed between its final and its ack leaves): take it
    unsettled, store the final (with ``store``, or the app's result store), give it back."""
    await app.start()
    deliveries = Drain(app.broker.consume([app.default_queue], prefetch=1))
    delivery = await deliveries.next()
    await deliveries.close()
    now = time.time()
    final = ResultEvent(kind="final", id=task_id, task=task, status="success",
                        returning=returning, ts=now, started_at=now, finished_at=now)
    if store is None:
        await app.results_store.publish(final, encode(final))
    else:
        await store(final)
    await delivery.requeue()

