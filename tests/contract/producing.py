"""Producing and running: tasks of every kind run where, when and in the order asked, and
bad input is refused before anything is published."""

from __future__ import annotations

import asyncio
import time

import pytest

from qtasks import ConfigurationError, MessageEncodeError, MessageTooLargeError, TaskStatus
from qtasks.protocol import decode_task, uuid7
from tests.contract.support import DEADLINE, Backend, Drain, running_worker


class ProducingContract:
    """The user's API end to end: every kind of task runs; queues, delay, concurrency,
    priority; what ``add_task`` refuses."""

    async def test_seed_generator_returns_handled_values(self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        async with running_worker(worker_app):
            task = await producer.add_task("test_yield", 5, timeout=DEADLINE)
        assert task.status is TaskStatus.SUCCESS
        assert task.returning == [8, 9, 10, 11, 12]
        assert task.partials == 5
        assert task.worker and task.started_at and task.finished_at
        assert task.started_at <= task.finished_at


    async def test_sync_function_and_sync_generator(self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        async with running_worker(worker_app):
            plain = await producer.add_task("sync_add", 2, b=3, timeout=DEADLINE)
            gen = await producer.add_task("sync_gen", 3, timeout=DEADLINE)
        assert plain.returning == 5
        assert gen.returning == [0, 10, 20]


    async def test_sync_generator_does_not_stall_the_loop(self, backend: Backend) -> None:
        """Neither a sync function nor a sync generator that block run on the loop."""
        producer, worker_app = backend.app(), backend.app()
        gaps: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        async with running_worker(worker_app):
            ticking = asyncio.create_task(ticker())
            plain = await producer.add_task("sync_add", 1, 2, pause=0.5)
            task = await producer.add_task("sync_gen", 4, pause=0.25, timeout=DEADLINE)
            await plain.wait(DEADLINE)
            stop.set()
            await ticking
        assert task.returning == [0, 10, 20, 30]
        assert plain.returning == 3
        # Each blocking sleep is 0.25 s; had it run on the loop, a gap would be >= 0.25 s.
        assert max(gaps) < 0.2, max(gaps)


    async def test_tasks_run_concurrently(self, backend: Backend) -> None:
        """Five runs that only finish when all five have started."""
        producer, worker_app = backend.app(), backend.app()
        token = uuid7()
        async with running_worker(worker_app, concurrency=5):
            tasks = [await producer.add_task("barrier", token, 5) for _ in range(5)]
            async with asyncio.timeout(DEADLINE):
                done = await asyncio.gather(*(t.wait() for t in tasks))
        assert [t.returning for t in done] == [5] * 5


    async def test_task_on_another_queue(self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        async with running_worker(worker_app, queues=["other"]):
            task = await producer.add_task("tagged", timeout=DEADLINE)
        assert task.returning == "other queue"


    async def test_delay(self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        async with running_worker(worker_app):
            begin = time.time()
            task = await producer.add_task("add", 1, 2, delay=0.5, timeout=DEADLINE)
        assert task.returning == 3
        assert task.started_at is not None and task.started_at - begin >= 0.45


    async def test_priority_is_honoured_or_refused(self, backend: Backend) -> None:
        producer = backend.app()
        if not producer.broker.supports_priority:
            with pytest.raises(ConfigurationError):
                await producer.add_task("add", 1, 2, priority=5)
            return
        highest = producer.broker.max_priority
        if highest is not None:  # clamped in silence, it would reorder nothing
            with pytest.raises(ConfigurationError, match=f"outside 0..{highest}"):
                await producer.add_task("add", 1, 2, priority=highest + 1)
        ids = {f"low-{uuid7()}": 1, f"high-{uuid7()}": 9}
        for task_id, priority in ids.items():
            task = await producer.add_task("add", 1, 2, priority=priority, task_id=task_id)
            assert task.id == task_id
        consumer = backend.app()
        await consumer.start()
        deliveries = Drain(consumer.broker.consume(["default"], prefetch=1))
        try:
            first = await deliveries.next()
            await first.ack()
            second = await deliveries.next()
            await second.ack()
        finally:
            await deliveries.close()
        order = [decode_task(d.body) for d in (first, second)]
        assert [(m.id.split("-")[0], m.priority) for m in order] == [("high", 9), ("low", 1)]
        assert {m.id for m in order} == set(ids)


    async def test_bad_input_is_refused_before_publishing(self, backend: Backend) -> None:
        producer, worker_app = backend.app(max_message_size=10_000), backend.app()
        with pytest.raises(MessageEncodeError):
            await producer.add_task("add", object(), 1)
        with pytest.raises(MessageTooLargeError, match="over the limit"):
            await producer.add_task("add", "x" * 20_000, 1)
        events = Drain(await worker_app.subscribe("add"))
        async with running_worker(worker_app):
            ok = await producer.add_task("add", 1, 1, timeout=DEADLINE)
            # The only task the worker ever saw is the valid one.
            first = await events.next()
            await events.close()
        assert ok.returning == 2
        assert first.id == ok.id

