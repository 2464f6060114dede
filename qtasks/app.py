"""``QueueTasks``: the application object a producer, a worker and a listener all share."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, overload

from qtasks.errors import ConfigurationError
from qtasks.executors import BaseTaskExecutor
from qtasks.interfaces import Broker, ResultStore, close_iterator
from qtasks.protocol import (
    DEFAULT_MAX_MESSAGE_SIZE,
    ControlMessage,
    ResultEvent,
    TaskMessage,
    encode,
    uuid7,
)
from qtasks.registry import broker_from_url, redact, results_from_url
from qtasks.signing import Signer
from qtasks.task import RetryPolicy, Task, TaskExecSchema, TaskFunction, TaskStatus

if TYPE_CHECKING:
    from qtasks.sync import SyncApp

log = logging.getLogger("qtasks")

DEFAULT_QUEUE = "default"


class QueueTasks:
    """Tasks, a broker to carry them and a result store to carry their results back.

    ``broker`` and ``results`` take a URL or an instance. Without them the environment
    decides (``QTASKS_BROKER_URL``, ``QTASKS_RESULTS_URL``), then ``memory://``: one
    process, nothing to install, and an embedded worker started on first use
    (``embedded_worker=False`` when the test or program runs its own ``Worker``). When only
    the broker is given, results travel over the same kind of server. With a
    ``signing_key`` (or ``QTASKS_SIGNING_KEY``) every task this app sends is signed and its
    workers refuse, dead-letter and log any task that is unsigned or forged.
    """

    def __init__(
        self,
        broker: str | Broker | None = None,
        results: str | ResultStore | None = None,
        *,
        executor: type[BaseTaskExecutor] | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        default_queue: str = DEFAULT_QUEUE,
        concurrency: int = 100,
        embedded_worker: bool | None = None,
        signing_key: str | bytes | None = None,
    ) -> None:
        broker = broker or os.environ.get("QTASKS_BROKER_URL") or "memory://"
        results = results or os.environ.get("QTASKS_RESULTS_URL") \
            or (broker if isinstance(broker, str) else "memory://")
        self.broker: Broker = broker_from_url(broker) if isinstance(broker, str) else broker
        self.results_store: ResultStore = (
            results_from_url(results) if isinstance(results, str) else results
        )
        self.executor = executor
        self.max_message_size = max_message_size
        self.default_queue = default_queue
        self.concurrency = concurrency
        self.embedded_worker = self.broker.embedded if embedded_worker is None else embedded_worker
        signing_key = signing_key or os.environ.get("QTASKS_SIGNING_KEY")
        self.signer = Signer(signing_key) if signing_key else None
        self.registry: dict[str, TaskExecSchema] = {}
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._embedded: Any = None  # the in-process Worker, for an embedded broker
        self._embedded_run: asyncio.Task[None] | None = None
        self._sync: SyncApp | None = None

    # -- declaring tasks -------------------------------------------------------------

    @overload
    def task(self, func: Callable[..., Any], /) -> TaskFunction: ...

    @overload
    def task(
        self, func: None = None, /, *, name: str | None = None, description: str | None = None,
        generate_handler: Callable[[Any], Any] | None = None,
        executor: type[BaseTaskExecutor] | None = None, queue: str | None = None,
        priority: int = 0, max_time: float | None = None, retry: int | RetryPolicy = 0,
        retry_backoff: float = 1.0, retry_backoff_max: float = 300.0,
        result_ttl: float | None = None, tags: tuple[str, ...] | list[str] = (),
    ) -> Callable[[Callable[..., Any]], TaskFunction]: ...

    def task(
        self,
        func: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        generate_handler: Callable[[Any], Any] | None = None,
        executor: type[BaseTaskExecutor] | None = None,
        queue: str | None = None,
        priority: int = 0,
        max_time: float | None = None,
        retry: int | RetryPolicy = 0,
        retry_backoff: float = 1.0,
        retry_backoff_max: float = 300.0,
        result_ttl: float | None = None,
        tags: tuple[str, ...] | list[str] = (),
    ) -> TaskFunction | Callable[[Callable[..., Any]], TaskFunction]:
        """Register a function (sync or async, plain or generator) as a task.

        ``retry`` is how many times a failing run is tried again, waiting ``retry_backoff``
        seconds, doubling up to ``retry_backoff_max`` (or a full ``RetryPolicy``).
        """
        self._check_priority(priority)
        self._check_result_ttl(result_ttl)
        policy = retry if isinstance(retry, RetryPolicy) else RetryPolicy(
            retries=retry, backoff=retry_backoff, backoff_max=retry_backoff_max)

        def register(f: Callable[..., Any]) -> TaskFunction:
            schema = TaskExecSchema(
                name=name or f.__name__, func=f, description=description or f.__doc__,
                generate_handler=generate_handler, executor=executor,
                queue=queue or self.default_queue, priority=priority, max_time=max_time,
                retry=policy, result_ttl=result_ttl, tags=tuple(tags),
            )
            if schema.name in self.registry:
                raise ConfigurationError(f"a task named {schema.name!r} is already registered")
            self.registry[schema.name] = schema
            return TaskFunction(self, schema)

        return register(func) if func is not None else register

    def queues(self) -> list[str]:
        """Every queue a registered task uses, the default queue first."""
        names = [self.default_queue]
        names += sorted({s.queue for s in self.registry.values()} - {self.default_queue})
        return names

    def _check_result_ttl(self, result_ttl: float | None) -> None:
        """A task's result cannot outlive what its store keeps: say so now, not when a
        result is missing a day later."""
        if result_ttl is None:
            return
        if result_ttl <= 0:
            raise ConfigurationError(f"result_ttl must be positive, not {result_ttl}")
        if result_ttl > self.results_store.ttl:
            raise ConfigurationError(
                f"result_ttl {result_ttl:g} s is longer than the result store keeps results "
                f"({self.results_store.ttl:g} s); raise the store's ttl (?ttl= in its URL)")

    def _check_priority(self, priority: int | None) -> None:
        if not priority:
            return
        if not self.broker.supports_priority:
            raise ConfigurationError(
                f"{type(self.broker).__name__} does not support task priorities; "
                "use separate queues instead")
        highest = self.broker.max_priority
        if highest is not None and not 0 <= priority <= highest:
            raise ConfigurationError(
                f"priority {priority} is outside 0..{highest}, the range "
                f"{type(self.broker).__name__} orders by (its max_priority option)")

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the broker and the result store; idempotent. Called on first use."""
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            await self.broker.start()
            await self.results_store.start()
            self._started = True

    async def _ensure_embedded_worker(self) -> None:
        if not self.embedded_worker or self._embedded_run is not None:
            return
        from qtasks.worker import Worker  # the worker imports this module

        self._embedded = Worker(self, concurrency=self.concurrency, name="embedded")
        self._embedded_run = asyncio.create_task(self._embedded.run(), name="qtasks-embedded")
        await self._embedded.wait_started()

    async def close(self) -> None:
        """Stop the embedded worker (if any) and disconnect."""
        if self._embedded_run is not None:
            self._embedded.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await self._embedded_run
            self._embedded_run = self._embedded = None
        if self._started:
            await self.broker.close()
            await self.results_store.close()
            self._started = False

    async def __aenter__(self) -> QueueTasks:
        await self.start()
        await self._ensure_embedded_worker()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # -- producing -------------------------------------------------------------------

    async def add_task(
        self,
        task_name: str,
        *args: Any,
        timeout: float | None = None,
        priority: int | None = None,
        delay: float | None = None,
        task_id: str | None = None,
        queue: str | None = None,
        max_time: float | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Task:
        """Enqueue a run of ``task_name``; return once the broker has the message.

        The task need not be registered here (a service can enqueue by name without its
        code); if it is, its queue, priority and ``max_time`` are the defaults. With
        ``timeout``, wait for the end and return the finished ``Task``; past the timeout a
        ``TaskTimeoutError`` naming the task id is raised and the task goes on.
        """
        schema = self.registry.get(task_name)
        priority = priority if priority is not None else (schema.priority if schema else 0)
        self._check_priority(priority)
        now = time.time()
        message = TaskMessage(
            id=task_id or uuid7(),
            task=task_name,
            args=list(args),
            kwargs=kwargs,
            queue=queue or (schema.queue if schema else self.default_queue),
            priority=priority,
            created_at=now,
            max_time=max_time if max_time is not None else (schema.max_time if schema else None),
            not_before=now + delay if delay else None,
            headers=dict(headers or {}),
        )
        await self.start()
        reply_to = self.results_store.reply_address
        if reply_to:
            message.headers["reply_to"] = reply_to
        await self._ensure_embedded_worker()
        await self.results_store.expect(message.id)
        await self.publish(message)
        task = Task(id=message.id, name=task_name, status=TaskStatus.NEW, created_at=now,
                    app=self)
        if timeout is not None:
            await task.wait(timeout)
        return task

    async def publish(self, message: TaskMessage) -> None:
        """Encode (within the size limit), sign if a key is set, and publish a task message."""
        limit = self.max_message_size
        if self.broker.max_message_size is not None:
            limit = min(limit, self.broker.max_message_size)
        await self.broker.publish(message, self._seal(encode(message, max_size=limit)))

    def _seal(self, body: bytes) -> bytes:
        """Signed when a signing key is set (task messages and cancel requests alike)."""
        return body if self.signer is None else self.signer.sign(body)

    # -- reading results -------------------------------------------------------------

    async def cancel(self, task_id: str, reason: str = "") -> None:
        """Ask every worker to cancel task ``task_id``: the one running it stops it (its
        final is ``cancelled``), and a worker that receives it later ends it ``cancelled``
        without running it. Like Celery's ``revoke``, it reaches the workers connected at
        the time of the call (each remembers it for ``Worker.revoke_ttl`` seconds); a
        synchronous function already running in a thread runs to its end, but its result
        is dropped. Signed when a signing key is set: workers ignore forged requests."""
        await self.start()
        request = ControlMessage(id=task_id, ts=time.time(), reason=reason)
        await self.broker.broadcast(self._seal(encode(request, max_size=self.max_message_size)))

    async def get(self, task_id: str) -> Task | None:
        """The latest known state of a task from any producer, or None (unknown, not
        started yet, or expired)."""
        await self.start()
        event = await self.results_store.get(task_id)
        if event is None or event.expired(time.time()):
            return None
        task = Task(id=task_id, name=event.task, app=self)
        task.apply(event)
        return task

    def task_handle(self, task_id: str, task_name: str = "") -> Task:
        """A handle on a task known only by id, to ``wait`` or ``stream`` it."""
        return Task(id=task_id, name=task_name, app=self)

    async def subscribe(self, task_name: str = "*") -> AsyncIterator[ResultEvent]:
        """Like ``listen`` but returns once the subscription is active."""
        await self.start()
        return await self.results_store.listen(task_name)

    async def listen(self, task_name: str = "*") -> AsyncIterator[ResultEvent]:
        """Every status, partial and final event of every run of ``task_name`` (``"*"``:
        every task), from any producer, live from now on."""
        events = await self.subscribe(task_name)
        try:
            async for event in events:
                yield event
        finally:
            await close_iterator(events)

    @property
    def sync(self) -> SyncApp:
        """The blocking API for code without an event loop; see ``qtasks.sync``."""
        if self._sync is None:
            from qtasks.sync import SyncApp

            self._sync = SyncApp(self)
        return self._sync

    def __repr__(self) -> str:
        broker = getattr(self.broker, "url", type(self.broker).__name__)
        return f"<QueueTasks broker={redact(str(broker))} tasks={len(self.registry)}>"
