"""Streaming: partials reach ``stream()`` and listeners as they are produced, in order."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from qtasks import TaskStatus
from qtasks.protocol import ResultEvent, uuid7
from tests.contract.support import DEADLINE, Backend, Drain, running_worker
from tests.contract.tasks import gate


class StreamingContract:
    """Partial results live: a task's stream, ``listen``/``subscribe``, and the events
    around them."""

    async def test_stream_yields_every_partial_in_order_then_ends(self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        async with running_worker(worker_app):
            task = await producer.add_task("count", 500)
            async with asyncio.timeout(DEADLINE):
                values = [v async for v in task.stream()]
                await task.wait()
        assert values == list(range(500))
        assert task.returning == list(range(500))


    async def test_stream_after_the_end_replays_from_the_first(self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        async with running_worker(worker_app):
            task = await producer.add_task("count", 20, timeout=DEADLINE)
        async with asyncio.timeout(DEADLINE):
            assert [v async for v in task.stream()] == list(range(20))


    async def test_partial_reaches_stream_before_the_next_yield(self, backend: Backend) -> None:
        """The generator waits until stream() received its first partial: it can only
        finish if partials are delivered as they are produced, not at the end."""
        producer, worker_app = backend.app(), backend.app()
        token = uuid7()
        async with running_worker(worker_app):
            task = await producer.add_task("handshake", token)
            received = []
            async with asyncio.timeout(DEADLINE):
                async for value in task.stream():
                    received.append(value)
                    if value == "first":
                        gate(token).set()
                await task.wait()
        assert received == ["first", "second"]
        assert task.status is TaskStatus.SUCCESS


    async def test_a_generator_that_never_awaits_streams_while_it_runs(
            self, backend: Backend) -> None:
        """Batching never holds a partial back while the generator runs: here the stream
        reader shares the worker's event loop, so it sees the first partial before the
        generator ends only if the worker gives the loop a turn while it yields."""
        producer, worker_app = backend.app(), backend.app()
        async with running_worker(worker_app):
            task = await producer.add_task("tight_burst", 0.4, 15_000)
            first: tuple[float, float] | None = None
            async with asyncio.timeout(DEADLINE):
                async for value in task.stream():
                    if first is None:
                        first = (value, time.time())
                await task.wait()
        assert first is not None and task.status is TaskStatus.SUCCESS
        yielded, received = first
        assert received < task.returning[-1], "the first partial came after the last yield"
        assert received - yielded < 0.2

    async def test_executor_replacement_still_streams(self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        async with running_worker(worker_app):
            task = await producer.add_task("doubled", 3)
            async with asyncio.timeout(DEADLINE):
                streamed = [v async for v in task.stream()]
            await task.wait(DEADLINE)
        assert streamed == [0, 2, 4]
        assert task.returning == [0, 2, 4]


    async def test_listen_sees_every_run_from_any_producer(self, backend: Backend) -> None:
        producer_a, producer_b = backend.app(), backend.app()
        listener, worker_app = backend.app(), backend.app()
        events = Drain(await listener.subscribe("count"))
        async with running_worker(worker_app):
            first = await producer_a.add_task("count", 2, timeout=DEADLINE)
            second = await producer_b.add_task("count", 2, timeout=DEADLINE)
            await producer_a.add_task("add", 1, 2, timeout=DEADLINE)  # another task name
            seen: dict[str, list[ResultEvent]] = {first.id: [], second.id: []}
            finals = 0
            while finals < 2:
                event = await events.next()
                assert event.task == "count"
                seen[event.id].append(event)
                finals += event.kind == "final"
            await events.close()
        for task_id in (first.id, second.id):
            kinds = [(e.kind, e.value) for e in seen[task_id]]
            assert kinds == [("status", None), ("partial", 0), ("partial", 1), ("final", None)]


    async def test_app_listen_follows_runs_live(self, backend: Backend) -> None:
        """``app.listen`` itself (``subscribe`` is the form that returns once live): it
        subscribes on its first iteration, so tasks are sent until it hears one."""
        producer, listener, worker_app = backend.app(), backend.app(), backend.app()
        stream = listener.listen("count")
        async with running_worker(worker_app):
            first = asyncio.ensure_future(anext(stream))
            try:
                async with asyncio.timeout(DEADLINE):
                    while not first.done():
                        await producer.add_task("count", 1, timeout=DEADLINE)
                        await asyncio.wait({first}, timeout=0.05)
                task = await producer.add_task("count", 2, timeout=DEADLINE)
                seen: list[tuple[str, Any]] = []
                async with asyncio.timeout(DEADLINE):
                    async for event in stream:
                        if event.id == task.id:
                            seen.append((event.kind, event.value))
                            if event.kind == "final":
                                break
            finally:
                first.cancel()
                await stream.aclose()
        assert seen == [("status", None), ("partial", 0), ("partial", 1), ("final", None)]


    async def test_listen_star_sees_every_task(self, backend: Backend) -> None:
        listener, producer, worker_app = backend.app(), backend.app(), backend.app()
        events = Drain(await listener.subscribe("*"))
        async with running_worker(worker_app):
            a = await producer.add_task("add", 1, 1, timeout=DEADLINE)
            b = await producer.add_task("sync_add", 1, 1, timeout=DEADLINE)
            finals: set[str] = set()
            while len(finals) < 2:
                event = await events.next()
                if event.kind == "final":
                    finals.add(event.id)
            await events.close()
        assert finals == {a.id, b.id}


    async def test_running_is_announced_before_partials_and_for_long_tasks_only(
            self, backend: Backend) -> None:
        """A quick task goes straight to its final (one result message, not two); a
        generator's ``running`` precedes its first partial; a task that outlives
        ``running_after`` is seen running while it runs."""
        producer, worker_app = backend.app(), backend.app()
        token = uuid7()
        async with running_worker(worker_app, running_after=1.0):
            quick = await producer.add_task("add", 1, 2)
            gen = await producer.add_task("count", 2)
            slow = await producer.add_task("held", token, "v")
            async with asyncio.timeout(DEADLINE):
                quick_events = [(e.kind, e.status) async for e in quick.events()]
                gen_events = [(e.kind, e.status) async for e in gen.events()]
                await gate(f"{token}:started").wait()
                slow_events = Drain(slow.events())
                first = await slow_events.next()
                gate(token).set()
                assert (await slow_events.next()).kind == "final"
                await slow_events.close()
        assert quick_events == [("final", "success")]
        assert gen_events == [("status", "running"), ("partial", None), ("partial", None),
                              ("final", "success")]
        assert (first.kind, first.status) == ("status", "running")

