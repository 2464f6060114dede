"""What ``@app.task`` builds (``TaskExecSchema``, ``TaskFunction``) and what ``add_task``
hands back (``Task``): the user's view of one task definition and of one run."""

from __future__ import annotations

import asyncio
import enum
import inspect
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qtasks.errors import TaskFailedError, TaskTimeoutError
from qtasks.interfaces import close_iterator
from qtasks.protocol import ErrorInfo, PartialOrder, ResultEvent

if TYPE_CHECKING:
    from qtasks.app import QueueTasks
    from qtasks.executors import BaseTaskExecutor


class TaskStatus(enum.StrEnum):
    """Where a run of a task stands. ``new``: queued (or queued again for a retry)."""

    NEW = "new"
    RUNNING = "running"
    SUCCESS = "success"
    ERROR = "error"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (TaskStatus.SUCCESS, TaskStatus.ERROR, TaskStatus.CANCELLED)


@dataclass(slots=True)
class RetryPolicy:
    """How often and how late a failed task runs again.

    ``retries`` is the number of runs after the first; the n-th retry waits
    ``min(backoff * 2**(n-1), backoff_max)`` seconds, with up to ``jitter`` of it random so
    that a burst of failures does not come back as a burst.
    """

    retries: int = 0
    backoff: float = 1.0
    backoff_max: float = 300.0
    jitter: float = 0.1
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def delay(self, failed_attempt: int) -> float:
        base = min(self.backoff * 2 ** (failed_attempt - 1), self.backoff_max)
        return float(base * (1 - self.jitter * random.random()))

    def should_retry(self, failed_attempt: int, exc: BaseException) -> bool:
        return failed_attempt <= self.retries and isinstance(exc, self.retry_on)


@dataclass(slots=True)
class TaskExecSchema:
    """A task definition: the function, how it is run, and its options.

    ``awaiting`` is true for ``async def`` functions and async generators (they run on the
    event loop); ``generating`` for generators of either kind (their yields are streamed).
    """

    name: str
    func: Callable[..., Any]
    description: str | None = None
    generate_handler: Callable[[Any], Any] | None = None
    executor: type[BaseTaskExecutor] | None = None
    queue: str = "default"
    priority: int = 0
    max_time: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    result_ttl: float | None = None
    tags: tuple[str, ...] = ()
    awaiting: bool = False
    generating: bool = False

    def __post_init__(self) -> None:
        func = self.func
        self.generating = inspect.isasyncgenfunction(func) or inspect.isgeneratorfunction(func)
        self.awaiting = inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func)


class TaskFunction:
    """The object ``@app.task`` puts in place of the function.

    Calling it runs the function here, as if undecorated; ``add_task`` runs it on a worker.
    """

    def __init__(self, app: QueueTasks, schema: TaskExecSchema) -> None:
        self.app = app
        self.schema = schema
        self.__name__ = schema.name
        self.__doc__ = schema.func.__doc__
        self.__wrapped__ = schema.func

    @property
    def name(self) -> str:
        return self.schema.name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.schema.func(*args, **kwargs)

    async def add_task(
        self,
        *args: Any,
        timeout: float | None = None,
        priority: int | None = None,
        delay: float | None = None,
        task_id: str | None = None,
        **kwargs: Any,
    ) -> Task:
        """Enqueue a run; see ``QueueTasks.add_task``."""
        return await self.app.add_task(
            self.schema.name, *args, timeout=timeout, priority=priority, delay=delay,
            task_id=task_id, **kwargs,
        )

    def __repr__(self) -> str:
        return f"<TaskFunction {self.schema.name}>"


@dataclass(slots=True)
class Restarted:
    """Yielded by ``Task.stream()`` when a retry starts over: the values before it belong
    to the failed attempt, the values after it to ``attempt``."""

    attempt: int
    error: ErrorInfo | None = None


@dataclass
class Task:
    """One run of a task as its submitter (or anyone holding its id) sees it."""

    id: str
    name: str
    status: TaskStatus = TaskStatus.NEW
    returning: Any = None
    error: ErrorInfo | None = None
    attempt: int = 1
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    partials: int = 0
    app: QueueTasks | None = field(default=None, repr=False, compare=False)

    def apply(self, event: ResultEvent) -> None:
        """Fold a status or final event into this handle."""
        if event.kind == "partial":
            return
        self.attempt = event.attempt
        if event.status is not None:
            self.status = TaskStatus(event.status)
        self.error = event.error
        self.created_at = event.created_at or self.created_at
        self.started_at = event.started_at or self.started_at
        self.worker = event.worker or self.worker
        if event.kind == "final":
            self.returning = event.returning
            self.finished_at = event.finished_at
            self.partials = event.partials

    async def events(self) -> AsyncIterator[ResultEvent]:
        """Every event of this run, de-duplicated, from the first; ends after the final.

        A partial is dropped if one with the same ``(attempt, seq)`` or an older attempt
        was already seen, so a redelivered run that repeats its first yields does not
        repeat them downstream.
        """
        if self.app is None:
            raise RuntimeError("this Task is not bound to an app")
        latest = PartialOrder()
        events = self.app.results_store.watch(self.id)
        try:
            async for event in events:
                if latest.take(event):
                    if event.kind != "partial":
                        self.apply(event)
                    yield event
                    if event.kind == "final":
                        return
        finally:
            await close_iterator(events)  # now, not by the loop's finaliser as a new task

    async def stream(self) -> AsyncIterator[Any]:
        """Each partial value, in order, from the first (even those published before this
        call), ending when the task ends. A ``Restarted`` marker separates attempts."""
        attempt = 0
        async for event in self.events():
            if event.kind != "partial":
                continue
            if attempt and event.attempt != attempt:
                yield Restarted(event.attempt, self.error)
            attempt = event.attempt
            yield event.value

    async def wait(self, timeout: float | None = None) -> Task:
        """Wait until the task has finished, whatever its status, and return this handle.

        Raises ``TaskTimeoutError`` (naming the task id) when ``timeout`` runs out; the
        task goes on."""
        if self.status.finished:
            return self
        if self.app is None:
            raise RuntimeError("this Task is not bound to an app")
        timer = asyncio.timeout(timeout)
        latest = PartialOrder()
        events = self.app.results_store.watch(self.id)
        try:
            # ``events()`` without its generator: a producer waits for every task it sends.
            async with timer:
                async for event in events:
                    if latest.take(event) and event.kind != "partial":
                        self.apply(event)
                        if event.kind == "final":
                            break
        except TimeoutError:
            if not timer.expired():
                raise  # a backend's own timeout, not this wait running out
            raise TaskTimeoutError(self.id, timeout) from None
        finally:
            await close_iterator(events)
        return self

    async def cancel(self, reason: str = "") -> None:
        """Ask the workers to cancel this task (``QueueTasks.cancel``); ``wait`` then
        returns it ``cancelled`` unless it finished first."""
        if self.app is None:
            raise RuntimeError("this Task is not bound to an app")
        await self.app.cancel(self.id, reason)

    async def result(self, timeout: float | None = None) -> Any:
        """``returning`` once the task succeeded; raises ``TaskFailedError`` otherwise."""
        await self.wait(timeout)
        if self.status is not TaskStatus.SUCCESS:
            err = self.error
            detail = f"{err.type}: {err.message}" if err else self.status.value
            raise TaskFailedError(f"task {self.name} {self.id} ended {self.status.value}: {detail}")
        return self.returning

