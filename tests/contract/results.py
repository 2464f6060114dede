"""Stored results: ``get`` and ``watch`` from any app, while running and after the end,
within the result TTL."""

from __future__ import annotations

import asyncio
import time

from qtasks import TaskStatus
from qtasks.protocol import ResultEvent, encode, uuid7
from tests.contract.support import DEADLINE, Backend, running_worker
from tests.contract.tasks import SHORT_RESULT_TTL, gate


class ResultsContract:
    """The result store: what a reader that did not submit the task finds, and when it
    stops finding it."""

    async def test_get_and_watch_from_an_app_that_did_not_submit(self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        async with running_worker(worker_app):
            task = await producer.add_task("count", 3, timeout=DEADLINE)
        reader = backend.app()
        found = await reader.get(task.id)
        assert found is not None
        assert found.status is TaskStatus.SUCCESS
        assert found.returning == [0, 1, 2]
        assert found.name == "count"
        assert found.created_at == task.created_at  # every reader knows when it was sent
        assert found.started_at is not None and found.finished_at is not None
        assert task.created_at is not None
        assert task.created_at <= found.started_at <= found.finished_at
        async with asyncio.timeout(DEADLINE):
            assert [v async for v in reader.task_handle(task.id).stream()] == [0, 1, 2]
        assert await reader.get(uuid7()) is None


    async def test_result_ttl_of_a_task_hides_its_result_once_past(
            self, backend: Backend) -> None:
        producer, worker_app, reader = backend.app(), backend.app(), backend.app()
        async with running_worker(worker_app):
            task = await producer.add_task("short_lived", timeout=DEADLINE)
        found = await reader.get(task.id)
        assert found is not None and found.returning == "brief"
        assert task.finished_at is not None
        async with asyncio.timeout(DEADLINE):
            while await reader.get(task.id) is not None:  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # polling the store under test, bounded
        assert time.time() >= task.finished_at + SHORT_RESULT_TTL


    async def test_get_while_running(self, backend: Backend) -> None:
        producer, worker_app, reader = backend.app(), backend.app(), backend.app()
        token = uuid7()
        async with running_worker(worker_app):
            task = await producer.add_task("held", token, "v")
            async with asyncio.timeout(DEADLINE):
                await gate(f"{token}:started").wait()
                while (state := await reader.get(task.id)) is None:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)  # polling the store under test, bounded
            assert state.status is TaskStatus.RUNNING
            gate(token).set()
            await task.wait(DEADLINE)
        assert task.returning == "v"


    async def test_watch_is_ordered_and_ends_after_final(self, backend: Backend) -> None:
        writer, reader = backend.app(), backend.app()
        await writer.start()
        await reader.start()
        task_id = uuid7()
        events = [ResultEvent(kind="status", id=task_id, task="t", status="running", ts=1.0)]
        events += [ResultEvent(kind="partial", id=task_id, task="t", seq=i, value=i)
                   for i in range(100)]
        events.append(ResultEvent(kind="final", id=task_id, task="t", status="success",
                                  returning=list(range(100)), partials=100))
        for event in events[:50]:
            await writer.results_store.publish(event, encode(event))
        received = []
        async with asyncio.timeout(DEADLINE):
            watcher = reader.results_store.watch(task_id)
            received.append(await anext(watcher))  # replayed from storage
            for event in events[50:]:
                await writer.results_store.publish(event, encode(event))
            received += [e async for e in watcher]
        keys = [(e.kind, e.seq) for e in received]
        deduplicated = list(dict.fromkeys(keys))
        assert deduplicated == [(e.kind, e.seq) for e in events]
        latest = await reader.results_store.get(task_id)
        assert latest is not None and latest.kind == "final"
        assert latest.returning == list(range(100))

