"""Cancellation: a running or queued task ends ``cancelled``; unsigned requests are
ignored."""

from __future__ import annotations

import asyncio

from qtasks import TaskStatus
from qtasks.protocol import uuid7
from tests.contract.support import DEADLINE, Backend, heard_cancel, running_worker
from tests.contract.tasks import CALLS, gate


class CancellationContract:
    """Cancel requests over the control channel."""

    async def test_cancel_stops_a_running_task_and_the_worker_goes_on(
            self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        token = uuid7()
        async with running_worker(worker_app):
            task = await producer.add_task("held", token, "v")
            async with asyncio.timeout(DEADLINE):
                await gate(f"{token}:started").wait()
            await task.cancel("changed my mind")
            done = await task.wait(DEADLINE)
            after = await producer.add_task("add", 1, 2, timeout=DEADLINE)
        assert done.status is TaskStatus.CANCELLED and done.error is not None
        assert done.error.type == "TaskCancelled"
        assert "while running: changed my mind" in done.error.message
        assert after.returning == 3


    async def test_cancel_of_a_queued_task_ends_it_without_running_it(
            self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        first, second = uuid7(), uuid7()
        async with running_worker(worker_app, concurrency=1) as worker:
            blocking = await producer.add_task("held", first)
            queued = await producer.add_task("record", second)  # waits: concurrency 1
            async with asyncio.timeout(DEADLINE):
                await gate(f"{first}:started").wait()
            await queued.cancel()
            await heard_cancel(worker, queued.id)
            gate(first).set()
            done = await queued.wait(DEADLINE)
            await blocking.wait(DEADLINE)
        assert done.status is TaskStatus.CANCELLED and done.error is not None
        assert "before it started" in done.error.message
        assert second not in CALLS
        assert blocking.status is TaskStatus.SUCCESS


    async def test_unsigned_cancel_requests_are_ignored(self, backend: Backend) -> None:
        producer, worker_app = backend.app(signing_key="k1"), backend.app(signing_key="k1")
        forger = backend.app(signing_key="not the key")
        token = uuid7()
        async with running_worker(worker_app) as worker:
            task = await producer.add_task("held", token, "kept")
            async with asyncio.timeout(DEADLINE):
                await gate(f"{token}:started").wait()
            await forger.cancel(task.id)
            await backend.app().cancel(task.id)  # no key at all
            other = await producer.add_task("add", 1, 1)
            await other.cancel()  # signed: heard, so the two before it were heard too
            await heard_cancel(worker, other.id)
            gate(token).set()
            done = await task.wait(DEADLINE)
        assert (done.status, done.returning) == (TaskStatus.SUCCESS, "kept")
        assert worker.revoked.reason(task.id) is None

