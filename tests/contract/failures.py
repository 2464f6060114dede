"""Failures: errors in a task, time limits, retries, unencodable results, and waits that
time out while the task goes on."""

from __future__ import annotations

import asyncio

import pytest

from qtasks import Restarted, TaskStatus, TaskTimeoutError
from qtasks.protocol import uuid7
from tests.contract.support import DEADLINE, Backend, running_worker
from tests.contract.tasks import gate


class FailuresContract:
    """What a task that fails, is too slow or is waited on too briefly ends as."""

    async def test_error_mid_generator_keeps_published_partials(self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        async with running_worker(worker_app):
            task = await producer.add_task("fail_mid_gen")
            async with asyncio.timeout(DEADLINE):
                streamed = [v async for v in task.stream()]
            await task.wait(DEADLINE)
            after = await producer.add_task("add", 2, 2, timeout=DEADLINE)
        assert streamed == [1, 2]
        assert task.status is TaskStatus.ERROR
        assert task.error is not None
        assert task.error.type == "ValueError"
        assert task.error.message == "broken after two"
        assert "fail_mid_gen" in task.error.traceback
        assert after.returning == 4


    @pytest.mark.parametrize("name", ["too_slow", "too_slow_sync"])
    async def test_max_time_exceeded_is_an_error(self, backend: Backend, name: str) -> None:
        producer, worker_app = backend.app(), backend.app()
        async with running_worker(worker_app):
            slow = await producer.add_task(name)
            fine = await producer.add_task("add", 1, 1, timeout=DEADLINE)
            await slow.wait(DEADLINE)
        assert fine.returning == 2
        assert slow.status is TaskStatus.ERROR
        assert slow.error is not None and slow.error.type == "TaskTimeLimitExceeded"
        assert slow.started_at is not None and slow.finished_at is not None
        # Ended at its limit, not when the function (30 s; 1 s in a thread) would have.
        assert 0.19 <= slow.finished_at - slow.started_at < 0.9


    async def test_retries_restart_the_stream(self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        token = uuid7()
        async with running_worker(worker_app):
            task = await producer.add_task("flaky", token, 2)
            async with asyncio.timeout(DEADLINE):
                streamed = [v async for v in task.stream()]
            await task.wait(DEADLINE)
        assert task.status is TaskStatus.SUCCESS
        assert task.attempt == 3
        assert task.returning == [3]
        assert streamed[0] == 1
        assert isinstance(streamed[1], Restarted) and streamed[1].attempt == 2
        assert streamed[2] == 2
        assert isinstance(streamed[3], Restarted) and streamed[3].attempt == 3
        assert streamed[4] == 3


    async def test_retries_exhausted_is_an_error(self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        async with running_worker(worker_app):
            task = await producer.add_task("flaky", uuid7(), 5, timeout=DEADLINE)
        assert task.status is TaskStatus.ERROR
        assert task.attempt == 3
        assert task.error is not None and task.error.message == "failure 3"
        # Backoff 0.05 s then 0.1 s, each less at most 10 % jitter, before the third run.
        assert task.created_at is not None and task.started_at is not None
        assert task.started_at - task.created_at >= 0.9 * (0.05 + 0.1)


    async def test_unencodable_result_is_an_error(self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        async with running_worker(worker_app):
            task = await producer.add_task("unencodable_result", timeout=DEADLINE)
        assert task.status is TaskStatus.ERROR
        assert task.error is not None and task.error.type == "MessageEncodeError"


    async def test_wait_timeout_names_the_task_and_the_task_goes_on(
            self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        token = uuid7()
        async with running_worker(worker_app):
            task = await producer.add_task("held", token, 7)
            with pytest.raises(TaskTimeoutError) as raised:
                await task.wait(timeout=0.2)
            assert task.id in str(raised.value)
            assert raised.value.task_id == task.id
            gate(token).set()
            await task.wait(DEADLINE)
        assert task.returning == 7


    async def test_add_task_timeout_raises_naming_the_task(self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        token = uuid7()
        async with running_worker(worker_app):
            with pytest.raises(TaskTimeoutError) as raised:
                await producer.add_task("held", token, 1, timeout=0.2)
            gate(token).set()
            task = await producer.task_handle(raised.value.task_id).wait(DEADLINE)
        assert task.returning == 1

