"""``QueueTasks``: the application object a producer, a worker and a listener all share."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import tzinfo
from types import TracebackType
from typing import Any, overload

from qtasks.canvas.signature import AppSignatures
from qtasks.errors import ConfigurationError, OptionError
from qtasks.executors import BaseTaskExecutor
from qtasks.interfaces import Broker, ResultStore, close_iterator
from qtasks.middleware import Middleware, MiddlewareChain
from qtasks.options import SendOptions, check_arguments, colliding_parameters
from qtasks.periodic import Schedule, make_schedule
from qtasks.protocol import DEFAULT_MAX_MESSAGE_SIZE, ResultEvent, TaskMessage, uuid7
from qtasks.ratelimit import parse_rate
from qtasks.registry import broker_from_url, redact, results_from_url
from qtasks.runtime import Runtime
from qtasks.schema import ExecutorClass, RetryPolicy, TaskExecSchema, TaskStatus
from qtasks.signing import Signer
from qtasks.sync import SyncApp
from qtasks.task import Task
from qtasks.task_function import TaskFunction
from qtasks.worker import Worker
from qtasks.workers import PING_WAIT, LiveWorker, WorkersChange, live_workers, watch_workers

DEFAULT_QUEUE = "default"


class QueueTasks(AppSignatures):
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
        middleware: Sequence[Middleware] = (),
    ) -> None:
        broker = broker or os.environ.get("QTASKS_BROKER_URL") or "memory://"
        results = results or os.environ.get("QTASKS_RESULTS_URL") \
            or (broker if isinstance(broker, str) else "memory://")
        signing_key = signing_key or os.environ.get("QTASKS_SIGNING_KEY")
        self.runtime = Runtime(
            broker_from_url(broker) if isinstance(broker, str) else broker,
            results_from_url(results) if isinstance(results, str) else results,
            executor=executor, max_message_size=max_message_size,
            default_queue=default_queue, signer=Signer(signing_key) if signing_key else None,
            middleware=MiddlewareChain(middleware))
        self.concurrency = concurrency
        self.embedded_worker = self.broker.embedded if embedded_worker is None else embedded_worker
        self._embedded: Worker | None = None  # the in-process worker, for an embedded broker
        self._embedded_run: asyncio.Task[None] | None = None
        self._sync: SyncApp | None = None
        #: Periodic tasks by schedule name (``periodic``), run by ``qtasks beat``.
        self.schedules: dict[str, Schedule] = {}

    # What the runtime holds, read through the app as before.
    @property
    def broker(self) -> Broker:
        return self.runtime.broker

    @property
    def results_store(self) -> ResultStore:
        return self.runtime.results_store

    @property
    def registry(self) -> dict[str, TaskExecSchema]:
        return self.runtime.registry

    @property
    def signer(self) -> Signer | None:
        return self.runtime.signer

    @property
    def executor(self) -> ExecutorClass | None:
        return self.runtime.executor

    @property
    def default_queue(self) -> str:
        return self.runtime.default_queue

    @property
    def max_message_size(self) -> int:
        return self.runtime.max_message_size

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
        rate_limit: str | None = None,
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
        rate_limit: str | None = None,
    ) -> TaskFunction | Callable[[Callable[..., Any]], TaskFunction]:
        """Register a function (sync or async, plain or generator) as a task.

        ``retry`` is how many times a failing run is tried again, waiting ``retry_backoff``
        seconds, doubling up to ``retry_backoff_max`` (or a full ``RetryPolicy``).
        ``rate_limit`` (``"100/s"``, ``"10/m"``, ``"1/h"``) bounds how often each worker
        process starts it; a task over it waits back in the broker (``qtasks.ratelimit``).
        """
        self.runtime.check_priority(priority)
        self.runtime.check_result_ttl(result_ttl)
        SendOptions(queue=queue, max_time=max_time)
        limit = parse_rate(rate_limit)
        policy = retry if isinstance(retry, RetryPolicy) else RetryPolicy(
            retries=retry, backoff=retry_backoff, backoff_max=retry_backoff_max)

        def register(f: Callable[..., Any]) -> TaskFunction:
            schema = TaskExecSchema(
                name=name or f.__name__, func=f, description=description or f.__doc__,
                generate_handler=generate_handler, executor=executor,
                queue=queue or self.default_queue, priority=priority, max_time=max_time,
                retry=policy, result_ttl=result_ttl, tags=tuple(tags), rate_limit=limit,
            )
            if schema.name in self.registry:
                raise ConfigurationError(f"a task named {schema.name!r} is already registered")
            self.registry[schema.name] = schema
            return TaskFunction(self, schema)

        return register(func) if func is not None else register

    def periodic(self, task: str | object, *, cron: str | None = None,
                 every: float | None = None, tz: str | tzinfo | None = None,
                 args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                 name: str | None = None, missed: str = "skip") -> Schedule:
        """Run ``task`` (a task, a signature ``task.s(...)`` or a task name) periodically:
        ``cron="*/5 * * * *"`` read in time zone ``tz`` (default UTC; needs the ``beat``
        extra), or ``every=`` seconds. ``qtasks beat module:app`` (or ``qtasks worker
        --beat``) enqueues each tick once, however many run. ``missed`` says what a beat
        does with ticks that fell due while none ran: ``"skip"`` them, or ``"run_once"``
        (the latest of them). See ``docs/periodic.md``."""
        schedule = make_schedule(task, cron=cron, every=every, tz=tz, args=args,
                                 kwargs=kwargs, name=name, missed=missed)
        if schedule.name in self.schedules:
            raise ConfigurationError(
                f"a periodic task named {schedule.name!r} is already declared; give each "
                "a name= of its own")
        self.schedules[schedule.name] = schedule
        return schedule

    def queues(self) -> list[str]:
        """Every queue a registered task uses, the default queue first."""
        return self.runtime.queues()

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the broker and the result store; idempotent. Called on first use."""
        await self.runtime.start()

    async def _ensure_embedded_worker(self) -> None:
        if not self.embedded_worker or self._embedded_run is not None:
            return
        self._embedded = Worker(self.runtime, concurrency=self.concurrency, name="embedded")
        self._embedded_run = asyncio.create_task(self._embedded.run(), name="qtasks-embedded")
        await self._embedded.wait_started()

    async def close(self) -> None:
        """Stop the embedded worker (if any) and disconnect."""
        if self._embedded_run is not None and self._embedded is not None:
            self._embedded.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await self._embedded_run
            self._embedded_run = self._embedded = None
        await self.runtime.close()

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

        The options share a namespace with the task's keyword arguments: for a task with
        a parameter named like an option, passing that name here is refused as ambiguous;
        ``send_task(name, args, kwargs, **options)`` keeps the two apart.
        """
        options = SendOptions(timeout=timeout, priority=priority, delay=delay,
                              task_id=task_id, queue=queue, max_time=max_time,
                              headers=headers)
        schema = self.registry.get(task_name)
        if schema is not None:
            given = {name for name in colliding_parameters(schema.func)
                     if getattr(options, name) is not None}
            if given:
                names = ", ".join(sorted(given))
                raise OptionError(
                    f"task {task_name!r} has a parameter named {names}, which add_task takes "
                    f"as an option; pass the task's arguments apart with "
                    f"apply_async(args, kwargs, **options) or send_task(name, args, kwargs)")
        return await self._send(task_name, args, kwargs, options)

    async def send_task(self, task_name: str, args: Sequence[Any] = (),
                        kwargs: Mapping[str, Any] | None = None, *,
                        timeout: float | None = None, priority: int | None = None,
                        delay: float | None = None, task_id: str | None = None,
                        queue: str | None = None, max_time: float | None = None,
                        headers: dict[str, str] | None = None) -> Task:
        """``add_task`` with the task's arguments apart from the options (Celery's
        ``send_task``): any argument name is the task's, none is taken as an option."""
        kwargs = {} if kwargs is None else kwargs
        check_arguments(args, kwargs)
        options = SendOptions(timeout=timeout, priority=priority, delay=delay,
                              task_id=task_id, queue=queue, max_time=max_time,
                              headers=headers)
        return await self._send(task_name, args, kwargs, options)

    async def _send(self, task_name: str, args: Sequence[Any], kwargs: Mapping[str, Any],
                    options: SendOptions) -> Task:
        schema = self.registry.get(task_name)
        priority = options.priority if options.priority is not None \
            else (schema.priority if schema else 0)
        self.runtime.check_priority(priority)
        now = time.time()
        max_time = options.max_time if options.max_time is not None \
            else (schema.max_time if schema else None)
        message = TaskMessage(
            id=options.task_id or uuid7(),
            task=task_name,
            args=list(args),
            kwargs=dict(kwargs),
            queue=options.queue or (schema.queue if schema else self.default_queue),
            priority=priority,
            created_at=now,
            max_time=max_time,
            not_before=now + options.delay if options.delay else None,
            headers=dict(options.headers or {}),
        )
        await self.start()
        reply_to = self.results_store.reply_address
        if reply_to:
            message.headers["reply_to"] = reply_to
        await self._ensure_embedded_worker()
        await self.results_store.expect(message.id)
        await self.runtime.publish(message)
        task = Task(id=message.id, name=task_name, status=TaskStatus.NEW, created_at=now,
                    runtime=self.runtime)
        if options.timeout is not None:
            await task.wait(options.timeout)
        return task

    async def publish(self, message: TaskMessage) -> None:
        """Encode (within the size limit), sign if a key is set, and publish a task message."""
        await self.runtime.publish(message)

    # -- reading results -------------------------------------------------------------

    async def cancel(self, task_id: str, reason: str = "") -> None:
        """Ask every worker to cancel task ``task_id``: the one running it stops it (its
        final is ``cancelled``), and a worker that receives it later ends it ``cancelled``
        without running it. Like Celery's ``revoke``, it reaches the workers connected at
        the time of the call (each remembers it for ``Worker.revoke_ttl`` seconds); a
        synchronous function already running in a thread runs to its end, but its result
        is dropped. Signed when a signing key is set: workers ignore forged requests."""
        await self.runtime.cancel(task_id, reason)

    async def get(self, task_id: str) -> Task | None:
        """The latest known state of a task from any producer, or None (unknown, not
        started yet, or expired)."""
        await self.start()
        event = await self.results_store.get(task_id)
        if event is None or event.expired(time.time()):
            return None
        task = Task(id=task_id, name=event.task, runtime=self.runtime)
        task.apply(event)
        return task

    def task_handle(self, task_id: str, task_name: str = "") -> Task:
        """A handle on a task known only by id, to ``wait`` or ``stream`` it."""
        return Task(id=task_id, name=task_name, runtime=self.runtime)

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

    # -- live workers (qtasks.workers) -----------------------------------------------

    async def workers(self, wait: float = PING_WAIT) -> list[LiveWorker]:
        """The live workers by name (host, pid, queues, concurrency, in flight, done,
        failed, uptime, last seen): a ping, and what every worker says within ``wait``."""
        return await live_workers(self.runtime, wait)

    def watch_workers(self, ping: bool = True) -> AsyncIterator[WorkersChange]:
        """Every change of the live set as it happens (``joined``, ``updated`` on each
        heartbeat, ``left`` on a goodbye, ``lost`` after three missed heartbeats), each
        with the whole set after it; close the iterator to stop."""
        return watch_workers(self.runtime, ping_first=ping)

    @property
    def sync(self) -> SyncApp:
        """The blocking API for code without an event loop; see ``qtasks.sync``."""
        if self._sync is None:
            self._sync = SyncApp(self)
        return self._sync

    def __repr__(self) -> str:
        broker = redact(self.broker.url) if self.broker.url else type(self.broker).__name__
        return f"<QueueTasks broker={broker} tasks={len(self.registry)}>"
