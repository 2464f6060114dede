"""The blocking API: the async API's semantics from plain threads."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from qtasks import QueueTasks, TaskStatus, TaskTimeoutError


@pytest.fixture
def app() -> Iterator[QueueTasks]:
    app = QueueTasks()

    @app.task
    def count(n: int):  # type: ignore[no-untyped-def]
        yield from range(n)

    @app.task
    async def hold(seconds: float) -> float:
        import asyncio

        await asyncio.sleep(seconds)
        return seconds

    yield app
    app.sync.close()


def test_enqueue_wait_stream_get(app: QueueTasks) -> None:
    client = app.sync
    task = client.add_task("count", 3, timeout=10)
    assert task.status is TaskStatus.SUCCESS
    assert task.returning == [0, 1, 2]
    assert list(task.stream()) == [0, 1, 2]
    found = client.get(task.id)
    assert found is not None and found.returning == [0, 1, 2]
    streamed = client.add_task("count", 50)
    assert list(streamed.stream()) == list(range(50))
    assert streamed.wait(10).returning == list(range(50))


def test_timeout_names_the_task(app: QueueTasks) -> None:
    with pytest.raises(TaskTimeoutError) as raised:
        app.sync.add_task("hold", 1.0, timeout=0.05)
    assert app.sync.task_handle(raised.value.task_id).wait(10).returning == 1.0


def test_listen_from_a_thread_while_others_enqueue(app: QueueTasks) -> None:
    client = app.sync
    events = client.listen("count")
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            results.append(client.add_task("count", 2, timeout=10).returning)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=produce) for _ in range(8)]
    for thread in threads:
        thread.start()
    finals = 0
    for event in events:
        finals += event.kind == "final"
        if finals == 8:
            break
    for thread in threads:
        thread.join(10)
    assert not errors
    assert results == [[0, 1]] * 8


def test_cancel_from_a_thread(app: QueueTasks) -> None:
    client = app.sync
    task = client.add_task("hold", 30.0)
    task.cancel("not needed")
    done = task.wait(10)
    assert done.status is TaskStatus.CANCELLED
    assert done.error is not None and "not needed" in done.error.message
