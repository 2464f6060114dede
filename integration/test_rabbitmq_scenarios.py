"""RabbitMQ with real worker processes started through the CLI, other processes reading
results, a poison message, a killed worker and a broker restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from integration.apps import open_gate
from integration.processes import WorkerProcess, workers
from integration.rabbitmq_support import (
    Child,
    Namespace,
    open_namespace,
    peek_dead,
    publish_raw,
    restart_rabbitmq,
)
from qtasks import QTasksError, Task, TaskStatus
from qtasks.brokers.rabbitmq import RabbitMQBroker
from qtasks.results.rabbitmq import RabbitMQResultStore

DEADLINE = 60.0


@pytest.fixture
async def namespace(rabbitmq_url: str, prefix: str, tmp_path: Path) -> AsyncIterator[Namespace]:
    async with open_namespace(rabbitmq_url, prefix, tmp_path) as ns:
        yield ns


async def first_file(directory: Path, pattern: str, timeout: float = DEADLINE) -> Path:
    """The first file matching ``pattern`` (a marker a worker process writes)."""
    async with asyncio.timeout(timeout):
        while not (found := sorted(directory.glob(pattern))):  # noqa: ASYNC110, ASYNC240
            await asyncio.sleep(0.02)  # the file system has no event to wait on; bounded
    return found[0]


async def test_two_worker_processes_share_the_load(namespace: Namespace) -> None:
    producer = namespace.app()
    with workers(namespace.env, count=2, concurrency=2) as procs:
        # prefetch = concurrency = 2: neither worker can take more than 2 of the 8 at once.
        tasks = [await producer.add_task("whoami", 0.3) for _ in range(8)]
        async with asyncio.timeout(DEADLINE):
            done = await asyncio.gather(*(t.wait() for t in tasks))
    assert all(t.status is TaskStatus.SUCCESS for t in done)
    assert {t.returning for t in done} == {p.pid for p in procs}


async def test_partials_reach_a_listener_in_another_process_while_running(
        namespace: Namespace) -> None:
    """A listener in another process has the first partial while the generator, in a CLI
    worker process, still runs: it waits at a gate (a marker file) that this test opens
    only after reading the state back, so that state is RUNNING whatever the load."""
    producer = namespace.app()
    listener = await Child.start(namespace, "listen", "gated_countdown")
    try:
        assert await listener.line() == "ready"
        with workers(namespace.env, count=1):
            task = await producer.add_task("gated_countdown", 3)
            events: list[Any] = []
            while not events or events[-1]["kind"] != "partial":
                events.append(await listener.line())
            # The listener has the first yield; the generator waits at the gate after it.
            state = await producer.get(task.id)
            assert state is not None and state.status is TaskStatus.RUNNING
            open_gate(namespace.test_dir)
            while events[-1]["kind"] != "final":
                events.append(await listener.line())
    finally:
        await listener.stop()
    assert {e["id"] for e in events} == {task.id}
    assert [e["value"] for e in events if e["kind"] == "partial"] == [2, 1, 0]
    assert [e["kind"] for e in events] == ["status", "partial", "partial", "partial", "final"]
    assert events[-1]["returning"] == [2, 1, 0]


async def test_a_task_is_read_back_by_id_in_a_process_that_did_not_submit_it(
        namespace: Namespace) -> None:
    submitter = await Child.start(namespace, "submit", "countdown", "[3, 0.05]")
    try:
        task_id = await submitter.line()
        assert await submitter.wait() == 0
    finally:
        await submitter.stop()
    reader = namespace.app()
    assert await reader.get(task_id) is None  # queued: no worker yet

    async def stream() -> list[object]:
        return [v async for v in reader.task_handle(task_id).stream()]

    early = asyncio.create_task(stream())  # follows it from before it starts
    with workers(namespace.env, count=1):
        async with asyncio.timeout(DEADLINE):
            assert await early == [2, 1, 0]
    found = await reader.get(task_id)
    assert found is not None and found.status is TaskStatus.SUCCESS
    assert found.returning == [2, 1, 0] and found.name == "countdown"
    late = namespace.app()  # after the end: replayed from the stream
    async with asyncio.timeout(DEADLINE):
        assert [v async for v in late.task_handle(task_id).stream()] == [2, 1, 0]


async def test_garbage_on_the_task_queue_is_dead_lettered_and_the_next_task_runs(
        namespace: Namespace) -> None:
    producer = namespace.app()
    garbage = b"\xff\x00 certainly not a task"
    with workers(namespace.env, count=1):
        await publish_raw(namespace, garbage)
        ok = await producer.add_task("add", 2, 3, timeout=DEADLINE)
        async with asyncio.timeout(DEADLINE):
            while not (dead := await peek_dead(namespace)):  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # polling the dead queue, bounded
    assert ok.returning == 5
    assert [m.body for m in dead] == [garbage]
    headers = dead[0].headers
    assert str(headers["x-qtasks-reason"]).startswith("undecodable")
    assert headers["x-qtasks-queue"] == "default"


async def test_kill_9_mid_task_and_the_other_worker_completes_it(
        namespace: Namespace) -> None:
    producer = namespace.app()
    with workers(namespace.env, count=2, concurrency=1) as procs:
        task = await producer.add_task("long_task", "k9", 1.5)
        marker = await first_file(namespace.test_dir, "started-k9-*")
        victim = next(p for p in procs if marker.name == f"started-k9-{p.pid}")
        survivor = next(p for p in procs if p is not victim)
        victim.kill()
        done = await task.wait(DEADLINE)
    assert done.status is TaskStatus.SUCCESS
    assert done.returning == f"k9 done by {survivor.pid}"


async def test_broker_restart_mid_load_loses_no_confirmed_task(namespace: Namespace) -> None:
    producer = namespace.app()
    confirmed: list[tuple[Task, int]] = []
    refused = 0

    async def produce(count: int) -> None:
        nonlocal refused
        for i in range(count):
            try:
                confirmed.append((await producer.add_task("add", i, i), i))
            except QTasksError:
                refused += 1  # not confirmed: the caller knows, nothing to check
            await asyncio.sleep(0.01)  # load shape: spread over the restart, not before it

    with workers(namespace.env, count=2, concurrency=10) as procs:
        load = asyncio.create_task(produce(150))
        async with asyncio.timeout(DEADLINE):
            while len(confirmed) < 30:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # until the load is under way, bounded
        await restart_rabbitmq(namespace.base_url)
        await asyncio.wait_for(load, DEADLINE)
        async with asyncio.timeout(2 * DEADLINE):
            for task, i in confirmed:
                await task.wait()
                assert task.status is TaskStatus.SUCCESS and task.returning == 2 * i
        assert all(p.proc.poll() is None for p in procs), "a worker died in the restart"
    assert len(confirmed) + refused == 150 and len(confirmed) >= 30
    broker, results = producer.broker, producer.results_store
    assert isinstance(broker, RabbitMQBroker) and isinstance(results, RabbitMQResultStore)
    assert broker.reconnects == 1 and results.reconnects == 1  # it did go through it


async def test_broker_restart_mid_stream_loses_no_partial(namespace: Namespace) -> None:
    """Partials published while RabbitMQ restarts are sent again before any later one,
    so the submitter's stream has every value once, in order."""
    producer = namespace.app()
    count = 300
    with workers(namespace.env, count=1) as procs:
        task = await producer.add_task("countdown", count, pause=0.02)
        values = task.stream()
        async with asyncio.timeout(DEADLINE):
            received = [await anext(values) for _ in range(20)]
        await restart_rabbitmq(namespace.base_url)
        back = time.time()
        async with asyncio.timeout(DEADLINE):
            received += [v async for v in values]
        done = await task.wait(DEADLINE)
        assert "reconnected to" in procs[0].output, procs[0].output  # it lived through it
    assert received == list(reversed(range(count)))
    assert done.returning == received
    assert done.finished_at is not None and done.finished_at > back  # still running then


async def test_sigkill_during_a_result_stream_then_a_new_worker(namespace: Namespace) -> None:
    """The only worker dies mid-generator; a worker started later runs the task again and
    the submitter's stream ends with the second run's values, de-duplicated."""
    producer = namespace.app()
    first = WorkerProcess(namespace.env, concurrency=1)
    try:
        first.wait_ready()
        task = await producer.add_task("countdown", 4, pause=0.5)
        values = task.stream()
        assert await anext(values) == 3
        first.kill()
    finally:
        first.kill()
    with workers(namespace.env, count=1):
        async with asyncio.timeout(DEADLINE):
            rest = [v async for v in values]
    assert rest == [2, 1, 0]
    assert (await task.wait(DEADLINE)).returning == [3, 2, 1, 0]
