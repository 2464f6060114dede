"""Multi-process scenarios on a real NATS JetStream server with CLI worker processes.

Each test has its own prefix, so its own streams, consumers and bucket, deleted at the end.
The server-restart scenarios run on a private server of their own (``restartable``): the
server on 4222 is shared and never restarted by a test.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest

from integration.nats_support import Child, PrivateServer, delete_namespace
from integration.processes import workers
from qtasks import QueueTasks, Task, TaskStatus

DEADLINE = 30.0


@pytest.fixture
def url(nats_url: str, prefix: str) -> str:
    return f"{nats_url}?prefix={prefix}"


@pytest.fixture
def env(url: str, tmp_path: Path) -> dict[str, str]:
    return {"QTASKS_BROKER_URL": url, "QTASKS_RESULTS_URL": url,
            "QTASKS_TEST_DIR": str(tmp_path), "QTASKS_LOG_LEVEL": "INFO"}


@pytest.fixture
async def producer(url: str, nats_url: str, prefix: str) -> AsyncIterator[QueueTasks]:
    app = QueueTasks(broker=url, results=url, embedded_worker=False)
    await app.start()
    yield app
    await app.close()
    await delete_namespace(nats_url, prefix)


@dataclass
class Restartable:
    """A private server, the worker environment for it and a producer on it."""

    server: PrivateServer
    env: dict[str, str]
    producer: QueueTasks


@pytest.fixture
async def restartable(env: dict[str, str], prefix: str,
                      tmp_path: Path) -> AsyncIterator[Restartable]:
    store = tmp_path / "nats"
    store.mkdir()
    server = PrivateServer(str(store))
    await asyncio.to_thread(server.start)
    try:
        url = f"{server.url}?prefix={prefix}"
        app = QueueTasks(broker=url, results=url, embedded_worker=False)
        try:
            await app.start()
            yield Restartable(server, {**env, "QTASKS_BROKER_URL": url,
                                       "QTASKS_RESULTS_URL": url}, app)
        finally:
            await app.close()
    finally:
        await asyncio.to_thread(server.stop)


@pytest.fixture
def child(env: dict[str, str]) -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for process in started:
        process.stop()


async def test_two_workers_share_the_load(producer: QueueTasks, env: dict[str, str]) -> None:
    with workers(env, count=2, concurrency=3) as procs:
        tasks = [await producer.add_task("whoami", 0.2) for _ in range(18)]
        async with asyncio.timeout(DEADLINE):
            done = await asyncio.gather(*(t.wait() for t in tasks))
    assert all(t.status is TaskStatus.SUCCESS for t in done)
    assert {t.returning for t in done} == {p.pid for p in procs}


async def test_partials_reach_a_listener_in_another_process_while_running(
        producer: QueueTasks, env: dict[str, str], child: list[Child]) -> None:
    listener = Child(env, "listen", "countdown")
    child.append(listener)
    # The child's lines come through a blocking queue: read them in a thread, so that the
    # event loop (the producer's connection, its PINGs) goes on meanwhile.
    assert await asyncio.to_thread(listener.line) == "READY"
    with workers(env, count=1):
        task = await producer.add_task("countdown", 3, pause=0.5)
        first = await asyncio.to_thread(listener.json)
        events = [first]
        while events[-1]["kind"] != "final":
            events.append(await asyncio.to_thread(listener.json))
        await task.wait(DEADLINE)
    partials = [e for e in events if e["kind"] == "partial"]
    assert [p["value"] for p in partials] == [2, 1, 0]
    assert all(e["id"] == task.id for e in events)
    # The first yield reached the other process before the generator had finished.
    assert task.finished_at is not None
    assert float(partials[0]["received"]) < task.finished_at - 0.5  # type: ignore[arg-type]


async def test_read_back_by_id_from_another_process(
        producer: QueueTasks, env: dict[str, str], child: list[Child]) -> None:
    with workers(env, count=1):
        task = await producer.add_task("countdown", 4, timeout=DEADLINE)
    reader = Child(env, "read", task.id)
    child.append(reader)
    got = await asyncio.to_thread(reader.json)
    assert got["get"] == {"status": "success", "name": "countdown",
                          "returning": [3, 2, 1, 0], "worker": task.worker}
    watched = await asyncio.to_thread(reader.json)
    assert watched == {"stream": [3, 2, 1, 0], "status": "success", "returning": [3, 2, 1, 0]}


async def test_garbage_is_dead_lettered_and_the_next_task_runs(
        producer: QueueTasks, env: dict[str, str], nats_url: str, prefix: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        dead = await nc.subscribe(f"{prefix}.dead.>")
        await nc.flush()
        garbage = b"\x00\xffnot a task {"
        with workers(env, count=1):
            await nc.jetstream().publish(f"{prefix}.tasks.default", garbage)
            task = await producer.add_task("add", 2, 3, timeout=DEADLINE)
            letter = await dead.next_msg(timeout=DEADLINE)
        stored = await nc.jetstream().get_msg(f"{prefix}_DEAD", seq=1)
    finally:
        await nc.close()
    assert task.returning == 5
    for msg in (letter, stored):
        assert msg.data == garbage
        assert msg.headers is not None
        assert msg.headers["QTasks-Dead-Reason"].startswith("undecodable")
        assert msg.headers["QTasks-Original-Subject"] == f"{prefix}.tasks.default"
        assert msg.headers["QTasks-Queue"] == "default"


async def test_kill_9_mid_task_and_the_task_completes_on_the_other_worker(
        nats_url: str, prefix: str, tmp_path: Path, env: dict[str, str]) -> None:
    ack_wait = 1.5
    url = f"{nats_url}?prefix={prefix}&ack_wait={ack_wait}"
    env = {**env, "QTASKS_BROKER_URL": url, "QTASKS_RESULTS_URL": url}
    app = QueueTasks(broker=url, results=url, embedded_worker=False)
    try:
        with workers(env, count=2, concurrency=1) as procs:
            task = await app.add_task("long_task", "k9", 3 * ack_wait)
            first_pid, started = await _marker(tmp_path, "started-k9-")
            # Alive past two lease periods: the heartbeats keep the message with it.
            await asyncio.sleep(max(0.0, started + 2 * ack_wait - time.time()))
            assert len(_markers(tmp_path, "started-k9-")) == 1
            os.kill(first_pid, signal.SIGKILL)
            await task.wait(DEADLINE)
            other = next(p.pid for p in procs if p.pid != first_pid)
        assert task.status is TaskStatus.SUCCESS
        assert task.returning == f"k9 done by {other}"
        assert task.attempt == 1
        assert set(_markers(tmp_path, "started-k9-")) == {first_pid, other}
    finally:
        await app.close()
        await delete_namespace(nats_url, prefix)


@pytest.mark.slow
async def test_server_restart_mid_load_loses_no_acknowledged_task(
        restartable: Restartable) -> None:
    producer, env = restartable.producer, restartable.env
    acknowledged: list[tuple[int, Task]] = []
    stop = asyncio.Event()

    async def produce(offset: int) -> None:
        i = offset
        while not stop.is_set():
            try:
                acknowledged.append((i, await producer.add_task("add", i, 1)))
            except Exception as exc:  # not acknowledged: not promised to run
                print(f"add_task {i} refused during the outage: {exc!r}")
            i += 10

    try:
        with workers(env, count=2, concurrency=5) as procs:
            producers = [asyncio.create_task(produce(k)) for k in range(10)]
            async with asyncio.timeout(DEADLINE):
                while len(acknowledged) < 100:  # noqa: ASYNC110 - progress check, bounded
                    await asyncio.sleep(0.01)
            await restartable.server.restart()
            before = len(acknowledged)
            async with asyncio.timeout(DEADLINE):
                while len(acknowledged) < before + 100:  # noqa: ASYNC110 - bounded
                    await asyncio.sleep(0.01)
            stop.set()
            async with asyncio.timeout(DEADLINE):
                await asyncio.gather(*producers)
                results = await asyncio.gather(*(t.wait() for _, t in acknowledged))
    finally:
        stop.set()
    assert len(results) >= 200
    assert [t.returning for t in results] == [i + 1 for i, _ in acknowledged]
    # Both workers lived through the outage (the tasks after it ran on them).
    assert all("NATS broker reconnected" in p.output for p in procs), procs[0].output


async def test_server_restart_mid_stream_loses_no_partial(
        restartable: Restartable) -> None:
    """Partials sent around a server restart are published again (with PubAcks) before
    any later one, so the submitter's stream has every value once, in order."""
    producer, env = restartable.producer, restartable.env
    count = 300
    with workers(env, count=1) as procs:
        task = await producer.add_task("countdown", count, 0.01)
        values = task.stream()
        async with asyncio.timeout(DEADLINE):
            received = [await anext(values) for _ in range(20)]
        await restartable.server.restart()
        back = time.time()
        async with asyncio.timeout(DEADLINE):
            received += [v async for v in values]
        done = await task.wait(DEADLINE)
        assert "NATS broker reconnected" in procs[0].output, procs[0].output
    assert received == list(reversed(range(count)))
    assert done.returning == received
    assert done.finished_at is not None and done.finished_at > back  # still running then


def _markers(directory: Path, prefix: str) -> dict[int, float]:
    """Markers ``prefix<pid>`` that workers left in ``directory``: pid -> when written."""
    return {int(p.read_text()): p.stat().st_mtime for p in directory.glob(f"{prefix}*")}


async def _marker(directory: Path, prefix: str, timeout: float = DEADLINE) -> tuple[int, float]:
    """The first marker a worker leaves (another process: nothing to await on but files)."""
    async with asyncio.timeout(timeout):
        while not (found := _markers(directory, prefix)):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return next(iter(found.items()))
