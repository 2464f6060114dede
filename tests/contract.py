"""The backend contract: everything a Broker/ResultStore pair must do, as tests.

One suite for every backend. A backend's test module subclasses ``BackendContract`` and
overrides the ``backend`` fixture with a ``Backend`` that makes fresh connections into one
isolated namespace (``tests/test_memory_contract.py``, ``integration/test_*_contract.py``).
Producer, worker and reader are separate apps with their own connections, as they would be
in separate processes; the worker runs in this process so that tests can hold a task at a
gate and see exactly when it is where.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from qtasks import (
    AsyncTaskExecutor,
    Broker,
    ConfigurationError,
    MessageEncodeError,
    MessageTooLargeError,
    QueueTasks,
    Restarted,
    ResultStore,
    Task,
    TaskMessage,
    TaskStatus,
    TaskTimeoutError,
    Worker,
)
from qtasks.interfaces import DeadLetter, close_iterator, dead_letter_ref
from qtasks.protocol import ResultEvent, decode_task, encode, uuid7

#: Upper bound for any single wait in these tests: a hang fails, it does not stall CI.
DEADLINE = 20.0

#: Per-test synchronisation between a test and the tasks it runs (same process).
GATES: dict[str, asyncio.Event] = {}
CALLS: dict[str, int] = {}


def gate(token: str) -> asyncio.Event:
    return GATES.setdefault(token, asyncio.Event())


#: The ``result_ttl`` of the contract's ``short_lived`` task, in seconds.
SHORT_RESULT_TTL = 0.5


class DoublingExecutor(AsyncTaskExecutor):
    """A replacement executor that overrides ``run_task_gen`` and still streams via emit."""

    async def run_task_gen(self) -> list[Any]:
        out = []
        async for value in self.iterate():
            out.append(await self.emit(value * 2))
        return out


def register_contract_tasks(app: QueueTasks) -> None:
    async def yield_func(result: int) -> int:
        return result + 2

    @app.task(name="test_yield", generate_handler=yield_func)
    async def test_yield(n: int):  # type: ignore[no-untyped-def]
        for _ in range(n):
            n += 1
            yield n

    @app.task(name="add")
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task(name="sync_add")
    def sync_add(a: int, b: int, pause: float = 0.0) -> int:
        time.sleep(pause)  # blocking on purpose: must not stall the event loop
        return a + b

    @app.task(name="sync_gen", generate_handler=lambda v: v * 10)
    def sync_gen(n: int, pause: float = 0.0):  # type: ignore[no-untyped-def]
        for i in range(n):
            time.sleep(pause)  # blocking on purpose: must not stall the event loop
            yield i

    @app.task(name="count")
    async def count(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i

    @app.task(name="handshake")
    async def handshake(token: str):  # type: ignore[no-untyped-def]
        yield "first"
        await gate(token).wait()  # released once the test's stream() has seen "first"
        yield "second"

    @app.task(name="record")
    async def record(token: str) -> int:
        CALLS[token] = CALLS.get(token, 0) + 1
        return CALLS[token]

    @app.task(name="held")
    async def held(token: str, value: Any = None) -> Any:
        gate(f"{token}:started").set()
        await gate(token).wait()
        return value

    @app.task(name="counted_hold")
    async def counted_hold(token: str) -> int:
        CALLS[token] = CALLS.get(token, 0) + 1
        gate(f"{token}:started").set()
        await gate(token).wait()
        return CALLS[token]

    @app.task(name="barrier")
    async def barrier(token: str, parties: int) -> int:
        CALLS[token] = CALLS.get(token, 0) + 1
        if CALLS[token] >= parties:
            gate(token).set()
        await gate(token).wait()
        return parties

    @app.task(name="fail_mid_gen")
    async def fail_mid_gen():  # type: ignore[no-untyped-def]
        yield 1
        yield 2
        raise ValueError("broken after two")

    @app.task(name="flaky", retry=2, retry_backoff=0.05)
    async def flaky(token: str, failures: int):  # type: ignore[no-untyped-def]
        CALLS[token] = CALLS.get(token, 0) + 1
        yield CALLS[token]
        if CALLS[token] <= failures:
            raise RuntimeError(f"failure {CALLS[token]}")

    @app.task(name="too_slow", max_time=0.2)
    async def too_slow() -> None:
        await asyncio.sleep(30)

    @app.task(name="too_slow_sync", max_time=0.2)
    def too_slow_sync() -> None:
        time.sleep(1.0)  # a thread cannot be interrupted: its result is dropped

    @app.task(name="unencodable_result")
    async def unencodable_result() -> object:
        return object()

    @app.task(name="doubled", executor=DoublingExecutor)
    async def doubled(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i

    @app.task(name="short_lived", result_ttl=SHORT_RESULT_TTL)
    async def short_lived() -> str:
        return "brief"

    @app.task(name="tagged", description="d", queue="other", tags=["a", "b"], result_ttl=60)
    async def tagged() -> str:
        return "other queue"


class Backend:
    """Fresh connections into one namespace; remembers every app to close it."""

    def __init__(self, broker: Callable[[], Broker], results: Callable[[], ResultStore]) -> None:
        self.make_broker = broker
        self.make_results = results
        self.apps: list[QueueTasks] = []

    def app(self, **options: Any) -> QueueTasks:
        app = QueueTasks(broker=self.make_broker(), results=self.make_results(),
                         embedded_worker=False, **options)
        register_contract_tasks(app)
        self.apps.append(app)
        return app

    async def close(self) -> None:
        for app in self.apps:
            with contextlib.suppress(Exception):
                await app.close()


@contextlib.asynccontextmanager
async def running_worker(app: QueueTasks, **options: Any) -> AsyncIterator[Worker]:
    worker = Worker(app, **options)
    run = asyncio.create_task(worker.run())
    async with asyncio.timeout(DEADLINE):
        started = asyncio.create_task(worker.wait_started())
        await asyncio.wait({run, started}, return_when=asyncio.FIRST_COMPLETED)
        if run.done():
            started.cancel()
            run.result()
    try:
        yield worker
    finally:
        worker.stop()
        async with asyncio.timeout(DEADLINE + worker.grace):
            await run


class Drain:
    """Reads an async iterator in a background task into a queue.

    Cancelling ``anext()`` on an async generator closes the generator, so a test that
    wants to see "nothing arrives for a while" cannot time out a pending ``anext``; it
    waits on this queue instead."""

    def __init__(self, iterator: AsyncIterator[Any]) -> None:
        self.iterator = iterator
        self.items: asyncio.Queue[Any] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for item in self.iterator:
            await self.items.put(item)

    async def next(self, timeout: float = DEADLINE) -> Any:
        getter = asyncio.ensure_future(self.items.get())
        done, _ = await asyncio.wait({getter, self.reader}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        if self.reader in done:
            self.reader.result()
            raise AssertionError("the iterator ended")
        raise AssertionError(f"nothing arrived within {timeout} s")

    async def nothing_within(self, timeout: float) -> bool:
        """True if nothing arrives for ``timeout`` seconds (a bounded negative check)."""
        try:
            item = await self.next(timeout)
        except AssertionError:
            return True
        await self.items.put(item)
        return False

    async def close(self) -> None:
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        await close_iterator(self.iterator)


def task_message(queue: str, priority: int = 0, not_before: float | None = None,
                 name: str = "add") -> tuple[TaskMessage, bytes]:
    message = TaskMessage(id=uuid7(), task=name, args=[1, 2], queue=queue, priority=priority,
                          created_at=time.time(), not_before=not_before)
    return message, encode(message)


async def publish_one(app: QueueTasks, queue: str) -> bytes:
    """Start ``app``, declare ``queue`` and publish one task on it; its body."""
    await app.start()
    await app.broker.declare([queue])
    message, body = task_message(queue)
    await app.broker.publish(message, body)
    return body


async def check_copies_join_the_run(
        app: QueueTasks, copies: int, caplog: pytest.LogCaptureFixture,
        meanwhile: Callable[[], Awaitable[None]] | None = None, quiet: float = 0.5) -> None:
    """The scenario of a lost lease, on a broker set up to lose it (a short RabbitMQ
    ``consumer_timeout``, NATS without heartbeats): a held task's message comes back to
    its worker ``copies`` times, each copy joins the run (``meanwhile`` runs then), and
    once released it has run once, ended once, and left nothing to deliver for ``quiet``
    seconds."""
    calls: list[int] = []
    release = asyncio.Event()

    @app.task
    async def long_held() -> int:
        calls.append(1)
        await release.wait()
        return len(calls)

    with caplog.at_level(logging.WARNING):
        async with running_worker(app, concurrency=2) as worker:
            task = await long_held.add_task()
            async with asyncio.timeout(DEADLINE):
                while worker.processed < copies:  # noqa: ASYNC110 - no event for it
                    await asyncio.sleep(0.02)  # the copies joined; bounded
            assert "delivered again while it is handled here" in caplog.text
            if meanwhile is not None:
                await meanwhile()
            assert not task.status.finished
            release.set()
            await task.wait(DEADLINE)
    assert (task.status, task.returning, len(calls)) == (TaskStatus.SUCCESS, 1, 1)
    deliveries = Drain(app.broker.consume(["default"], prefetch=2))
    try:
        assert await deliveries.nothing_within(quiet)
    finally:
        await deliveries.close()


async def kept_dead_letters(app: QueueTasks, count: int) -> list[DeadLetter]:
    """The namespace's dead letters once there are ``count`` (a broker may file them a
    moment after the settle returned)."""
    async with asyncio.timeout(DEADLINE):
        while len(letters := await app.broker.dead_letters()) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return letters


async def three_readers(task: Task, reader: QueueTasks, listener: Drain,
                        count: int) -> tuple[list[Any], list[Any], list[Any]]:
    """The partial values of ``task`` as its submitter's ``stream()``, a late reader's
    ``stream()`` by id, and a listener subscribed before it ran each saw them."""
    async with asyncio.timeout(DEADLINE):
        live = [v async for v in task.stream()]
        late = [v async for v in reader.task_handle(task.id).stream()]
        listened = []
        while len(listened) < count:
            event = await listener.next()
            if event.kind == "partial":
                listened.append(event.value)
    await listener.close()
    return live, late, listened


async def settled(worker: Worker, count: int) -> None:
    """Until ``worker`` has settled ``count`` deliveries (bounded)."""
    async with asyncio.timeout(DEADLINE):
        while worker.processed < count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # the worker has no event for it; bounded


async def heard_cancel(worker: Worker, task_id: str) -> None:
    """Until ``worker`` has heard the cancel request for ``task_id`` (bounded)."""
    async with asyncio.timeout(DEADLINE):
        while worker.revoked.reason(task_id) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # the worker has no event for it; bounded


async def redeliver_with_final(app: QueueTasks, task_id: str, task: str, returning: Any,
                               store: Callable[[ResultEvent], Any] | None = None) -> None:
    """Make the next delivery of the queued task ``task_id`` a redelivery whose final is
    already stored (what a worker killed between its final and its ack leaves): take it
    unsettled, store the final (with ``store``, or the app's result store), give it back."""
    await app.start()
    deliveries = Drain(app.broker.consume([app.default_queue], prefetch=1))
    delivery = await deliveries.next()
    await deliveries.close()
    now = time.time()
    final = ResultEvent(kind="final", id=task_id, task=task, status="success",
                        returning=returning, ts=now, started_at=now, finished_at=now)
    if store is None:
        await app.results_store.publish(final, encode(final))
    else:
        await store(final)
    await delivery.requeue()


class BackendContract:
    """Subclass and override ``backend``."""

    @pytest.fixture
    async def backend(self) -> AsyncIterator[Backend]:
        raise NotImplementedError("a backend's test module overrides this fixture")
        yield  # pragma: no cover

    # -- the user's API end to end -------------------------------------------------

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

    async def test_a_task_delivered_again_while_it_runs_is_not_run_twice(
            self, backend: Backend) -> None:
        """A copy of a running task's message (a lost lease redelivered, or a publish
        retried) joins the run: one run, one final, and nothing left to deliver."""
        producer, worker_app = backend.app(), backend.app()
        token = uuid7()
        async with running_worker(worker_app, concurrency=4) as worker:
            task = await producer.add_task("counted_hold", token)
            async with asyncio.timeout(DEADLINE):
                await gate(f"{token}:started").wait()
            copy = TaskMessage(id=task.id, task="counted_hold", args=[token],
                               created_at=time.time())
            await producer.publish(copy)
            if not producer.broker.deduplicates:
                await settled(worker, 1)  # the copy joined the run, which still waits
            assert CALLS[token] == 1
            gate(token).set()
            await task.wait(DEADLINE)
            after = await producer.add_task("add", 1, 1, timeout=DEADLINE)
            await settled(worker, 2 if producer.broker.deduplicates else 3)
        assert (task.returning, after.returning, CALLS[token]) == (1, 2, 1)
        # Exactly those deliveries: a copy a deduplicating broker let through would show.
        assert worker.processed == (2 if producer.broker.deduplicates else 3)
        # Both deliveries were settled with the run: a new consumer gets nothing.
        deliveries = Drain(producer.broker.consume(["default"], prefetch=4))
        try:
            assert await deliveries.nothing_within(0.5)
        finally:
            await deliveries.close()

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

    async def test_redelivered_task_with_a_stored_final_is_not_run_again(
            self, backend: Backend) -> None:
        """A worker stored the final and died before its ack: the redelivery is acked
        without running the task, and the stored final is what the submitter gets."""
        producer, worker_app = backend.app(), backend.app()
        token = uuid7()
        task = await producer.add_task("record", token)
        await redeliver_with_final(worker_app, task.id, "record", "stored")
        async with running_worker(worker_app) as worker:
            done = await task.wait(DEADLINE)
            await settled(worker, 1)
        assert (done.status, done.returning) == (TaskStatus.SUCCESS, "stored")
        assert token not in CALLS
        # Settled without a new run: what the store keeps is still the stored final.
        kept = await backend.app().get(task.id)
        assert kept is not None and kept.returning == "stored"

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

    async def test_executor_replacement_still_streams(self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        async with running_worker(worker_app):
            task = await producer.add_task("doubled", 3)
            async with asyncio.timeout(DEADLINE):
                streamed = [v async for v in task.stream()]
            await task.wait(DEADLINE)
        assert streamed == [0, 2, 4]
        assert task.returning == [0, 2, 4]

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

    # -- failures ------------------------------------------------------------------

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

    async def test_unknown_task_is_dead_lettered_and_the_worker_goes_on(
            self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        async with running_worker(worker_app) as worker:
            unknown = await producer.add_task("no_such_task", 1)
            garbage, garbage_body = TaskMessage(id=uuid7(), task="add"), b"\x00 not json"
            await producer.broker.publish(garbage, garbage_body)
            ok = await producer.add_task("add", 1, 2, timeout=DEADLINE)
            assert ok.returning == 3
            await settled(worker, 3)
            # The submitter hears of it at once, instead of waiting out its timeout.
            await unknown.wait(DEADLINE)
        assert unknown.status is TaskStatus.ERROR and unknown.error is not None
        assert unknown.error.type == "UnknownTaskError"
        assert "'no_such_task'" in unknown.error.message
        # Nothing is lost: both messages are kept with the reason.
        letters = await kept_dead_letters(producer, 2)
        assert {(letter.body == garbage_body, letter.reason.split(":")[0])
                for letter in letters} == {(False, "unknown task"), (True, "undecodable")}

    async def test_an_unknown_task_requeued_once_deployed_runs(self, backend: Backend) -> None:
        """Rolled out in the wrong order: the worker does not know the task yet, so it
        ends ``error`` and is kept; requeued once a worker knows it, it runs, and ``get``
        reports the new outcome."""
        producer = backend.app()
        old = QueueTasks(broker=backend.make_broker(), results=backend.make_results(),
                         embedded_worker=False)  # knows no task at all
        backend.apps.append(old)
        async with running_worker(old):
            task = await producer.add_task("add", 2, 3, timeout=DEADLINE)
        assert task.error is not None and task.error.type == "UnknownTaskError"
        [letter] = await kept_dead_letters(producer, 1)
        assert letter.ref == dead_letter_ref(letter.body)  # alike on every broker
        assert await producer.broker.dead_count() == 1
        assert await producer.broker.requeue_dead(["0123456789abcdef"]) == []
        assert await producer.broker.requeue_dead([letter.ref]) == [letter.ref]
        async with running_worker(backend.app()):
            async with asyncio.timeout(DEADLINE):
                while (found := await producer.get(task.id)) is None \
                        or found.status is not TaskStatus.SUCCESS:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)  # polling the store under test, bounded
        assert found.returning == 5
        assert await producer.broker.dead_letters() == []

    async def test_forged_or_unsigned_tasks_never_run(self, backend: Backend) -> None:
        producer, worker_app = backend.app(signing_key="k1"), backend.app(signing_key="k1")
        forger, unsigned = backend.app(signing_key="not the key"), backend.app()
        await producer.start()
        token = uuid7()
        async with running_worker(worker_app) as worker:
            forged = await forger.add_task("record", token)
            plain = await unsigned.add_task("record", token)
            # A signed body whose arguments were changed in transit.
            message, body = task_message("default", name="record")
            assert producer.signer is not None
            signed = producer.signer.sign(body)
            tampered = signed.replace(b"[1,2]", b"[1,3]")
            assert tampered != signed
            await producer.broker.publish(message, tampered)
            genuine = await producer.add_task("record", token, timeout=DEADLINE)
            await settled(worker, 4)
        assert genuine.returning == 1
        assert CALLS[token] == 1
        assert await producer.get(forged.id) is None
        assert await producer.get(plain.id) is None
        assert await producer.get(message.id) is None

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

    # -- the broker contract directly ----------------------------------------------

    async def test_prefetch_bounds_unsettled_deliveries(self, backend: Backend) -> None:
        app = backend.app()
        await app.start()
        queue = "bounded"
        await app.broker.declare([queue])
        bodies = []
        for _ in range(3):
            message, body = task_message(queue)
            await app.broker.publish(message, body)
            bodies.append(body)
        deliveries = Drain(app.broker.consume([queue], prefetch=2))
        try:
            first = await deliveries.next()
            second = await deliveries.next()
            assert await deliveries.nothing_within(0.5)
            await first.ack()
            third = await deliveries.next()
            await second.ack()
            await third.ack()
        finally:
            await deliveries.close()
        assert sorted([first.body, second.body, third.body]) == sorted(bodies)

    async def test_requeue_and_closed_consumer_redeliver(self, backend: Backend) -> None:
        app, other = backend.app(), backend.app()
        await other.start()
        queue = "redeliver"
        body = await publish_one(app, queue)
        deliveries = Drain(app.broker.consume([queue], prefetch=1))
        delivery = await deliveries.next()
        assert delivery.body == body and not delivery.redelivered
        await delivery.requeue()
        again = await deliveries.next()
        assert again.body == body and again.redelivered
        # Never settled: closing the consumer's broker gives it to another consumer.
        await deliveries.close()
        await app.broker.close()
        elsewhere = Drain(other.broker.consume([queue], prefetch=1))
        try:
            third = await elsewhere.next()
            assert third.body == body and third.redelivered
            await third.ack()
            assert await elsewhere.nothing_within(0.3)
        finally:
            await elsewhere.close()

    async def test_retry_later_comes_back_after_the_delay(self, backend: Backend) -> None:
        app = backend.app()
        queue = "later"
        body = await publish_one(app, queue)
        deliveries = Drain(app.broker.consume([queue], prefetch=1))
        try:
            delivery = await deliveries.next()
            settled = time.monotonic()
            await delivery.retry_later(0.4)
            again = await deliveries.next()
            assert time.monotonic() - settled >= 0.35
            assert again.body == body
            await again.ack()
        finally:
            await deliveries.close()

    async def test_dead_letter_is_not_redelivered(self, backend: Backend) -> None:
        app = backend.app()
        queue = "dead"
        body = await publish_one(app, queue)
        deliveries = Drain(app.broker.consume([queue], prefetch=1))
        try:
            delivery = await deliveries.next()
            await delivery.dead_letter("test reason")
            await delivery.ack()  # settling twice is a no-op
            assert await deliveries.nothing_within(0.5)
        finally:
            await deliveries.close()
        [letter] = await kept_dead_letters(app, 1)
        assert (letter.queue, letter.body, letter.reason) == (queue, body, "test reason")
        # A new consumer does not get it either: it left the queue, not just this lease.
        again = Drain(app.broker.consume([queue], prefetch=1))
        try:
            assert await again.nothing_within(0.5)
        finally:
            await again.close()

    # -- the result store contract directly ----------------------------------------

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

