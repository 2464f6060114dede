"""Middleware hooks and the task context, on the embedded memory backends."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from typing import Any

import pytest

from qtasks import (
    DeadLettered,
    Middleware,
    Outcome,
    QueueTasks,
    RetryPolicy,
    TaskContext,
    TaskMessage,
    WorkerInfo,
    current_task,
)
from qtasks.middleware import MiddlewareChain

DEADLINE = 10


class Recorder(Middleware):
    """Every hook call, in order, with what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def before_publish(self, message: TaskMessage) -> None:
        message.headers["seen-by"] = "recorder"
        self.calls.append(("before_publish", message.task))

    def after_publish(self, message: TaskMessage) -> None:
        self.calls.append(("after_publish", message.task))

    def worker_start(self, worker: WorkerInfo) -> None:
        self.calls.append(("worker_start", worker.queues))

    def worker_stop(self, worker: WorkerInfo) -> None:
        self.calls.append(("worker_stop", worker.queues))

    def before_run(self, context: TaskContext) -> None:
        self.calls.append(("before_run", (context.name, context.attempt)))

    def on_partial(self, context: TaskContext, seq: int, value: Any) -> None:
        self.calls.append(("on_partial", (seq, value)))

    def after_run(self, context: TaskContext, outcome: Outcome) -> None:
        self.calls.append(("after_run", (context.attempt, outcome.status, outcome.partials,
                                         outcome.error.type if outcome.error else None)))

    def on_retry(self, context: TaskContext, error: BaseException, delay: float) -> None:
        self.calls.append(("on_retry", (context.attempt, type(error).__name__)))

    def on_dead_letter(self, letter: DeadLettered) -> None:
        self.calls.append(("on_dead_letter", (letter.queue, letter.reason)))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class Broken(Middleware):
    """Raises in every hook it has."""

    def before_publish(self, message: TaskMessage) -> None:
        raise RuntimeError("broken before_publish")

    def before_run(self, context: TaskContext) -> None:
        raise RuntimeError("broken before_run")

    def on_partial(self, context: TaskContext, seq: int, value: Any) -> None:
        raise RuntimeError("broken on_partial")

    def after_run(self, context: TaskContext, outcome: Outcome) -> None:
        raise RuntimeError("broken after_run")


async def test_every_hook_is_called_in_order_around_a_streaming_task() -> None:
    recorder = Recorder()
    app = QueueTasks(middleware=[recorder])

    @app.task
    async def count(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i

    async with app:
        done = await count.add_task(3, timeout=DEADLINE)
    assert done.returning == [0, 1, 2]
    calls = recorder.calls
    names = recorder.names()
    assert calls[0] == ("worker_start", ("default",))  # the embedded worker, started first
    assert calls[names.index("before_publish"):names.index("before_publish") + 2] == [
        ("before_publish", "count"), ("after_publish", "count")]
    run = [c for c in calls if c[0] in ("before_run", "on_partial", "after_run")]
    assert run == [("before_run", ("count", 1)), ("on_partial", (0, 0)),
                   ("on_partial", (1, 1)), ("on_partial", (2, 2)),
                   ("after_run", (1, "success", 3, None))]
    assert calls[-1] == ("worker_stop", ("default",))


async def test_a_header_set_before_publish_reaches_the_task_context() -> None:
    app = QueueTasks(middleware=[Recorder()])

    @app.task
    async def headers() -> dict[str, str]:
        return dict(current_task().headers)

    async with app:
        done = await headers.add_task(timeout=DEADLINE)
    assert done.returning["seen-by"] == "recorder"


async def test_a_retry_is_an_outcome_and_a_hook_then_a_new_attempt() -> None:
    recorder = Recorder()
    app = QueueTasks(middleware=[recorder])

    @app.task(retry=RetryPolicy(retries=1, backoff=0.01, jitter=0))
    async def flaky() -> int:
        if current_task().attempt == 1:
            raise ValueError("first attempt fails")
        return current_task().attempt

    async with app:
        done = await flaky.add_task(timeout=DEADLINE)
    assert done.returning == 2
    run = [c for c in recorder.calls if c[0] in ("before_run", "after_run", "on_retry")]
    assert run == [("before_run", ("flaky", 1)), ("on_retry", (1, "ValueError")),
                   ("after_run", (1, "retry", 0, "ValueError")),
                   ("before_run", ("flaky", 2)), ("after_run", (2, "success", 0, None))]
    publishes = [c for c in recorder.calls if c[0] == "after_publish"]
    assert len(publishes) == 2  # the producer's and the retry's


async def test_errors_and_cancellations_are_outcomes() -> None:
    recorder = Recorder()
    app = QueueTasks(middleware=[recorder])
    started = asyncio.Event()

    @app.task
    async def fails() -> None:
        raise KeyError("nope")

    @app.task
    async def held() -> None:
        started.set()
        await asyncio.Event().wait()

    async with app:
        failed = await fails.add_task()
        await failed.wait(DEADLINE)
        task = await held.add_task()
        await asyncio.wait_for(started.wait(), DEADLINE)
        await app.cancel(task.id)
        await task.wait(DEADLINE)
    outcomes = [c[1] for c in recorder.calls if c[0] == "after_run"]
    assert outcomes == [(1, "error", 0, "KeyError"), (1, "cancelled", 0, "TaskCancelled")]


async def test_dead_letters_are_reported_with_a_short_reason() -> None:
    recorder = Recorder()
    url = f"memory://{uuid.uuid4().hex}"
    app = QueueTasks(url, middleware=[recorder])
    async with app:
        await app.broker.publish(TaskMessage(id="x", task="nothing"), b"not json")
        unknown = await app.add_task("no_such_task")
        await unknown.wait(DEADLINE)
        async with asyncio.timeout(DEADLINE):
            while len(await app.broker.dead_letters()) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # bounded poll for the second dead letter
    letters = sorted(c[1] for c in recorder.calls if c[0] == "on_dead_letter")
    assert letters == [("default", "undecodable"), ("default", "unknown_task")]


async def test_a_failing_middleware_is_logged_and_never_fails_a_task(
        caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    app = QueueTasks(middleware=[Broken(), recorder])

    @app.task
    async def gen():  # type: ignore[no-untyped-def]
        yield "a"
        yield "b"

    with caplog.at_level(logging.ERROR, logger="qtasks.middleware"):
        async with app:
            done = await gen.add_task(timeout=DEADLINE)
    assert done.returning == ["a", "b"]
    # The next middleware still ran after the broken one.
    assert ("after_run", (1, "success", 2, None)) in recorder.calls
    failures = [r.getMessage() for r in caplog.records]
    for hook in ("before_publish", "before_run", "on_partial", "after_run"):
        assert f"middleware Broken failed in {hook}; ignored" in failures


async def test_current_task_in_async_sync_and_generator_tasks() -> None:
    app = QueueTasks()

    def describe() -> dict[str, Any]:
        context = current_task()
        return {"id": context.id, "name": context.name, "attempt": context.attempt,
                "queue": context.queue, "worker": context.worker}

    @app.task(queue="q1")
    async def in_async() -> dict[str, Any]:
        return describe()

    @app.task
    def in_sync() -> list[Any]:
        return [describe(), threading.current_thread() is not threading.main_thread()]

    @app.task
    def in_sync_gen():  # type: ignore[no-untyped-def]
        yield describe()["name"]
        yield describe()["name"]

    async with app:
        first = await in_async.add_task(timeout=DEADLINE)
        second = await in_sync.add_task(timeout=DEADLINE)
        third = await in_sync_gen.add_task(timeout=DEADLINE)
    worker = first.returning["worker"]
    assert first.returning == {"id": first.id, "name": "in_async", "attempt": 1,
                               "queue": "q1", "worker": worker}
    assert worker == "embedded"  # the app's in-process worker names itself so
    assert second.returning == [{"id": second.id, "name": "in_sync", "attempt": 1,
                                 "queue": "default", "worker": worker}, True]
    assert third.returning == ["in_sync_gen", "in_sync_gen"]


async def test_concurrent_tasks_each_see_their_own_context() -> None:
    app = QueueTasks()
    gate = asyncio.Event()

    @app.task
    async def mine(n: int) -> list[Any]:
        await gate.wait()  # all of them running at once before any reads its context
        return [n, current_task().id]

    async with app:
        tasks = [await mine.add_task(i) for i in range(20)]
        gate.set()
        done = [await t.wait(DEADLINE) for t in tasks]
    assert [d.returning for d in done] == [[i, t.id] for i, t in enumerate(tasks)]


def test_current_task_outside_a_task_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="outside a running task"):
        current_task()


def test_only_overridden_hooks_are_called_and_bad_middleware_is_refused() -> None:
    chain = MiddlewareChain([Broken()])
    assert [h for h, calls in chain._calls.items() if calls] == [
        "before_publish", "before_run", "on_partial", "after_run"]
    assert not MiddlewareChain()
    with pytest.raises(TypeError, match="Middleware instances"):
        MiddlewareChain([object()])  # type: ignore[list-item]
