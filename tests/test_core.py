"""The core without a broker in mind: declaring tasks, executors, the registry, the worker's
stop, and the seed program run exactly as written."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from qtasks import (
    AsyncTaskExecutor,
    ConfigurationError,
    QueueTasks,
    RetryPolicy,
    SyncTaskExecutor,
    TaskExecSchema,
    TaskStatus,
    Worker,
)
from qtasks.brokers.memory import MemoryBroker
from qtasks.protocol import ResultEvent, encode
from qtasks.registry import broker_from_url, redact, results_from_url
from qtasks.results.memory import MemoryResultStore

ROOT = Path(__file__).resolve().parent.parent


def test_seed_program_prints_the_seed_result() -> None:
    out = subprocess.run([sys.executable, "examples/yield_task.py"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.splitlines() == ["6", "7", "8", "9", "10", "[8, 9, 10, 11, 12]"]


def test_demo_command_streams_then_prints_the_list() -> None:
    out = subprocess.run([sys.executable, "-m", "qtasks", "demo", "--delay", "0.01"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    partials = [line.rsplit(" ", 1)[-1] for line in out.splitlines() if "partial" in line]
    assert partials == ["8", "9", "10", "11", "12"]
    assert out.splitlines()[-1] == "success: returning = [8, 9, 10, 11, 12]"


def test_schema_flags_follow_the_seed() -> None:
    async def coro() -> None: ...
    async def agen():  # type: ignore[no-untyped-def]
        yield 1
    def func() -> None: ...
    def gen():  # type: ignore[no-untyped-def]
        yield 1
    flags = {f.__name__: (TaskExecSchema(f.__name__, f).awaiting,
                          TaskExecSchema(f.__name__, f).generating)
             for f in (coro, agen, func, gen)}
    assert flags == {"coro": (True, False), "agen": (True, True), "func": (False, False),
                     "gen": (False, True)}


async def test_executors_run_locally_with_handler_and_emit() -> None:
    published: list[Any] = []

    async def publish(value: Any) -> None:
        published.append(value)

    def gen(n: int):  # type: ignore[no-untyped-def]
        yield from range(n)

    schema = TaskExecSchema("gen", gen, generate_handler=lambda v: v + 1)
    result = await SyncTaskExecutor(schema, (3,), publish=publish).execute()
    assert result == [1, 2, 3]
    assert published == [1, 2, 3]

    async def plain(a: int, *, b: int) -> int:
        return a * b

    assert await AsyncTaskExecutor(TaskExecSchema("p", plain), (3,), {"b": 4}).execute() == 12


class TenfoldExecutor(AsyncTaskExecutor):
    """An app-wide replacement that overrides ``run_task_gen`` and streams through emit."""

    async def run_task_gen(self) -> list[Any]:
        return [await self.emit(value * 10) async for value in self.iterate()]


async def test_an_app_wide_executor_runs_every_task_that_names_none() -> None:
    app = QueueTasks(executor=TenfoldExecutor)

    @app.task
    async def counted(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i

    @app.task(executor=AsyncTaskExecutor)  # a task's own executor wins
    async def plain(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i

    async with app:
        task = await counted.add_task(3)
        async with asyncio.timeout(10):
            streamed = [v async for v in task.stream()]
        await task.wait(10)
        own = await plain.add_task(3, timeout=10)
    assert streamed == task.returning == [0, 10, 20]
    assert own.returning == [0, 1, 2]


def test_decorator_bare_and_with_options_and_direct_call() -> None:
    app = QueueTasks()

    @app.task
    def double(x: int) -> int:
        return x * 2

    @app.task(name="renamed", queue="q2", priority=3, max_time=5, retry=2, tags=["x"])
    async def other() -> None: ...

    assert double(21) == 42  # a direct call runs locally
    assert app.registry["double"].queue == "default"
    schema = app.registry["renamed"]
    assert (schema.queue, schema.priority, schema.max_time, schema.retry.retries,
            schema.tags) == ("q2", 3, 5, 2, ("x",))
    assert app.queues() == ["default", "q2"]
    with pytest.raises(ConfigurationError, match="already registered"):
        app.task(name="double")(lambda: None)


def test_unsupported_priority_is_refused_at_configuration() -> None:
    class NoPriorities(MemoryBroker):
        supports_priority = False

    app = QueueTasks(broker=NoPriorities())
    with pytest.raises(ConfigurationError, match="priorities"):
        app.task(priority=1)(lambda: None)


def test_registry_resolves_and_explains() -> None:
    assert isinstance(broker_from_url("memory://"), MemoryBroker)
    assert isinstance(results_from_url("memory://x"), MemoryResultStore)
    with pytest.raises(ConfigurationError, match="known: amqp, amqps, memory, nats, tls"):
        broker_from_url("redis://localhost")
    with pytest.raises(ConfigurationError, match="no scheme"):
        broker_from_url("127.0.0.1")
    assert redact("amqp://user:secret@host:5672/") == "amqp://user:***@host:5672/"
    assert redact("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


class PluginBroker(MemoryBroker):
    """A third-party broker as a plugin would ship one: found through its entry point."""


def test_third_party_backends_register_through_entry_points(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real installed distribution's metadata, found by importlib.metadata on sys.path.
    dist = tmp_path / "qtasks_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: qtasks-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[qtasks.brokers]\nplugin = tests.test_core:PluginBroker\n"
        "[qtasks.results]\nplugin = qtasks.results.memory:MemoryResultStore\n")
    with pytest.raises(ConfigurationError, match=r"qtasks\.brokers' entry-point group"):
        broker_from_url("plugin://before")
    monkeypatch.syspath_prepend(str(tmp_path))
    broker = broker_from_url("plugin://shared")
    assert type(broker) is PluginBroker and broker.url == "plugin://shared"
    app = QueueTasks(broker="plugin://shared", results="plugin://shared")
    assert type(app.broker) is PluginBroker
    assert isinstance(app.results_store, MemoryResultStore)


def test_a_result_ttl_the_store_cannot_keep_is_refused() -> None:
    app = QueueTasks(results="memory://?ttl=60")
    with pytest.raises(ConfigurationError, match="longer than the result store keeps"):
        app.task(result_ttl=120)(lambda: None)
    with pytest.raises(ConfigurationError, match="must be positive"):
        app.task(result_ttl=0)(lambda: None)
    assert app.task(name="kept", result_ttl=60)(lambda: None).schema.result_ttl == 60


async def test_memory_results_expire_on_time_without_other_traffic() -> None:
    ttl = 0.2
    app = QueueTasks(broker=f"memory://{uuid.uuid4().hex}",
                     results=f"memory://{uuid.uuid4().hex}?ttl={ttl}")

    @app.task
    async def once() -> int:
        return 1

    async with app:
        task = await once.add_task(timeout=10)
        assert task.finished_at is not None
        assert (await app.get(task.id)) is not None
        async with asyncio.timeout(10):
            while await app.get(task.id) is not None:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # polling the store under test, bounded
    assert time.time() >= task.finished_at + ttl


def test_the_core_imports_no_broker_library() -> None:
    code = ("import sys, qtasks, qtasks.cli, qtasks.worker, qtasks.operator, qtasks.sync, "
            "qtasks.demo, qtasks.brokers.memory, qtasks.results.memory\n"
            "app = qtasks.QueueTasks()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('aio_pika', 'aiormq', 'pamqp', 'nats')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_retry_backoff_doubles_up_to_its_cap_with_bounded_jitter() -> None:
    policy = RetryPolicy(retries=5, backoff=1.0, backoff_max=5.0, jitter=0.1)
    for attempt, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (5, 5.0)]:
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(0.9 * base <= d <= base for d in delays), (attempt, min(delays))
        assert max(delays) - min(delays) > 0.01 * base  # jittered, not all equal
    assert RetryPolicy(jitter=0.0).delay(3) == 4.0
    assert policy.should_retry(5, ValueError()) and not policy.should_retry(6, ValueError())


def test_environment_configures_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QTASKS_BROKER_URL", "memory://from-env")
    app = QueueTasks()
    assert isinstance(app.broker, MemoryBroker) and app.broker.url == "memory://from-env"
    assert isinstance(app.results_store, MemoryResultStore)


async def test_embedded_worker_with_async_with() -> None:
    app = QueueTasks()

    @app.task
    async def hello(name: str) -> str:
        return f"hello {name}"

    async with app:
        task = await hello.add_task("you", timeout=10)
    assert task.returning == "hello you"
    assert task.status is TaskStatus.SUCCESS


def _held_app() -> tuple[QueueTasks, QueueTasks, dict[str, asyncio.Event]]:
    url = f"memory://{uuid.uuid4().hex}"
    events: dict[str, asyncio.Event] = {"started": asyncio.Event(), "release": asyncio.Event()}
    apps = []
    for _ in range(2):
        app = QueueTasks(broker=MemoryBroker(url), results=MemoryResultStore(url),
                         embedded_worker=False)

        @app.task
        async def held() -> str:
            events["started"].set()
            await events["release"].wait()
            return "finished"

        apps.append(app)
    return apps[0], apps[1], events


async def test_graceful_stop_finishes_in_flight_work() -> None:
    producer, worker_app, events = _held_app()
    worker = Worker(worker_app, grace=10)
    run = asyncio.create_task(worker.run())
    task = await producer.add_task("held")
    await asyncio.wait_for(events["started"].wait(), 10)
    worker.stop()
    asyncio.get_running_loop().call_later(0.1, events["release"].set)
    await asyncio.wait_for(run, 10)
    assert (await task.wait(1)).returning == "finished"


async def test_stop_past_grace_gives_the_task_back() -> None:
    producer, worker_app, events = _held_app()
    worker = Worker(worker_app, grace=0.1)
    run = asyncio.create_task(worker.run())
    task = await producer.add_task("held")
    await asyncio.wait_for(events["started"].wait(), 10)
    began = time.monotonic()
    worker.stop()
    await asyncio.wait_for(run, 10)
    assert time.monotonic() - began < 5
    assert (await producer.get(task.id)).status is TaskStatus.RUNNING  # type: ignore[union-attr]
    # The message went back unacked: a new worker runs it to the end.
    events["release"].set()
    second = Worker(worker_app)
    rerun = asyncio.create_task(second.run())
    assert (await task.wait(10)).returning == "finished"
    second.stop()
    await asyncio.wait_for(rerun, 10)


async def test_wait_reports_a_backend_timeout_as_it_is() -> None:
    """Only the wait's own deadline becomes TaskTimeoutError; a backend's TimeoutError
    (a lost connection, say) is not disguised as "did not finish within None s"."""
    from qtasks import TaskTimeoutError

    class FailingStore(MemoryResultStore):
        async def watch(self, task_id: str):  # type: ignore[no-untyped-def, override]
            raise TimeoutError("backend gave up")
            yield  # pragma: no cover

    app = QueueTasks(results=FailingStore(), embedded_worker=False)
    with pytest.raises(TimeoutError, match="backend gave up") as raised:
        await app.task_handle("x", "t").wait(timeout=None)
    assert not isinstance(raised.value, TaskTimeoutError)


async def test_memory_store_keeps_at_most_max_tasks_finished_tasks() -> None:
    """The embedded store lives in the app's process: its finished tasks are bounded
    (oldest final first), so a long-running single-process app stays flat."""
    store = MemoryResultStore("memory://?max_tasks=3")
    ids = [f"t{i}" for i in range(5)]
    for task_id in ids:
        final = ResultEvent(kind="final", id=task_id, task="t", status="success", returning=1)
        await store.publish(final, encode(final))
    assert [await store.get(task_id) is not None for task_id in ids] == \
        [False, False, True, True, True]
    # What it keeps to expire them on time is bounded too (it grew for the whole TTL).
    for i in range(5_000):
        final = ResultEvent(kind="final", id=f"u{i}", task="t", status="success")
        await store.publish(final, encode(final))
    assert len(store.hub.logs) == 3 and len(store.hub.expiry) <= 2 * 3 + 1024 + 1
    with pytest.raises(ConfigurationError, match="max_tasks"):
        MemoryResultStore("memory://?max_tasks=0")
    # One URL serves both; a typo is an error, not a silent default.
    MemoryBroker("memory://?ttl=5&max_tasks=3")  # the store's options: accepted
    with pytest.raises(ConfigurationError, match=r"unknown memory:// option\(s\) max_task;"):
        QueueTasks(broker="memory://?max_task=3")
    with pytest.raises(ConfigurationError, match="bad memory:// option value"):
        MemoryResultStore("memory://?ttl=soon")


async def test_memory_store_keeps_a_final_its_submitter_has_not_read_yet() -> None:
    """``max_tasks`` never drops a result its submitter still waits for: a program that
    sends more tasks than that and then waits for each gets every one."""
    store = MemoryResultStore("memory://?max_tasks=3")
    ids = [f"t{i}" for i in range(6)]
    for task_id in ids:
        await store.expect(task_id)  # what add_task does before publishing
        final = ResultEvent(kind="final", id=task_id, task="t", status="success", returning=1)
        await store.publish(final, encode(final))
    async with asyncio.timeout(5):
        for task_id in ids:
            assert [e.kind async for e in store.watch(task_id)] == ["final"]
    # Read now: the oldest beyond max_tasks go, as for tasks nobody waited for.
    assert [await store.get(task_id) is not None for task_id in ids] == \
        [False, False, False, True, True, True]
