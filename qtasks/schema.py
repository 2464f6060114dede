"""What a task is, before anything runs it: its definition (``TaskExecSchema``), how often
it may run again (``RetryPolicy``) and where one run of it stands (``TaskStatus``).

Plain data at the bottom of the core: the runtime, the worker, the executors and the app
all read these, and this module reads none of them. An executor is known here only by
the shape the worker calls (``ExecutorClass``), so that a replacement executor need not
subclass anything.
"""

from __future__ import annotations

import enum
import inspect
import random
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

from qtasks.ratelimit import RateLimit


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


#: Publishes one handled partial value; given by the worker, absent for a local run.
PublishPartial = Callable[[Any], Awaitable[None]]


class TaskRun(Protocol):
    """One run of a task as the worker drives it: ``execute()`` returns ``returning``."""

    async def execute(self) -> Any: ...


class ExecutorClass(Protocol):
    """What ``executor=`` takes: called with the schema, the arguments and the worker's
    means (a partial publisher, a thread pool), it gives one ``TaskRun``.
    ``qtasks.executors.BaseTaskExecutor`` and its subclasses are such classes."""

    def __call__(self, schema: TaskExecSchema, args: tuple[Any, ...] | list[Any] = (),
                 kwargs: dict[str, Any] | None = None, *,
                 publish: PublishPartial | None = None,
                 thread_pool: Executor | None = None) -> TaskRun: ...


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
    executor: ExecutorClass | None = None
    queue: str = "default"
    priority: int = 0
    max_time: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    result_ttl: float | None = None
    tags: tuple[str, ...] = ()
    #: At most so many starts per second/minute/hour in one worker (``qtasks.ratelimit``).
    rate_limit: RateLimit | None = None
    awaiting: bool = False
    generating: bool = False

    def __post_init__(self) -> None:
        func = self.func
        self.generating = inspect.isasyncgenfunction(func) or inspect.isgeneratorfunction(func)
        self.awaiting = inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func)
