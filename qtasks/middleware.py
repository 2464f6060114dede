"""Middleware: code that watches (and may annotate) every task a producer sends and a
worker runs, without the task knowing. Metrics and tracing are built on it.

Subclass ``Middleware`` and override the hooks you need; every hook is a no-op here.
Pass instances as ``QueueTasks(middleware=[...])``: the app's producer side and every
worker built from it call them in list order.

The hooks are plain functions, not coroutines, on purpose: ``on_partial`` runs once per
yield on the hot path, and a coroutine per call would cost every task whether or not a
middleware wants it. A hook that must do I/O schedules it itself
(``asyncio.get_running_loop().create_task``). A hook that raises is logged with its
middleware's name and otherwise ignored: a broken middleware never fails a task, never
stops a worker and never blocks a publish. Only the hooks a middleware overrides are
called, so an app with none pays nothing per task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from qtasks.context import TaskContext
from qtasks.interfaces import DeadLetterReason
from qtasks.protocol import ErrorInfo, TaskMessage

log = logging.getLogger(__name__)

#: How an attempt ended. ``retry``: it failed and another attempt is scheduled;
#: ``interrupted``: the worker stopped before it ended and gave the message back.
OutcomeStatus = Literal["success", "error", "cancelled", "retry", "interrupted"]

@dataclass(frozen=True, slots=True)
class Outcome:
    """The end of one attempt, as ``after_run`` receives it."""

    status: OutcomeStatus
    #: Wall time of the attempt in seconds, from ``before_run`` to its end.
    duration: float
    #: How many partial results it published.
    partials: int
    #: The error (type, message, traceback) unless it succeeded or was interrupted.
    error: ErrorInfo | None = None


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """The worker as ``worker_start`` and ``worker_stop`` see it."""

    name: str
    queues: tuple[str, ...]
    concurrency: int


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """A message the worker or its broker moved to the dead letters."""

    queue: str
    reason: DeadLetterReason
    #: The full reason, as stored with the dead letter (free text, for logs only).
    detail: str
    #: The decoded task message, when the body was one.
    message: TaskMessage | None = None


class Middleware:
    """The hooks, all no-ops. Override what you need; see the module's docstring for the
    rules every hook runs under."""

    # -- producer side -------------------------------------------------------------

    def before_publish(self, message: TaskMessage) -> None:
        """A task message is about to be encoded and published. ``message.headers`` may be
        changed here (a trace context goes in as ``traceparent``); the rest is the
        caller's and must stay as it is."""

    def after_publish(self, message: TaskMessage) -> None:
        """The broker has confirmed the message: it is durable."""

    # -- worker side ---------------------------------------------------------------

    def worker_start(self, worker: WorkerInfo) -> None:
        """The worker is connected and about to take tasks."""

    def worker_stop(self, worker: WorkerInfo) -> None:
        """The worker has stopped taking tasks and has drained (or given back) the rest."""

    def before_run(self, context: TaskContext) -> None:
        """An attempt is about to run, in the asyncio task that runs it: a context variable
        set here is seen by the task's code (and by its thread, for a sync task)."""

    def on_partial(self, context: TaskContext, seq: int, value: Any) -> None:
        """The attempt published partial result number ``seq`` (0, 1, 2 …)."""

    def after_run(self, context: TaskContext, outcome: Outcome) -> None:
        """The attempt ended; called once for every ``before_run``. For ``success``,
        ``error`` and ``cancelled`` the final is durable by now."""

    def on_retry(self, context: TaskContext, error: BaseException, delay: float) -> None:
        """The attempt failed and the next one is enqueued to run in ``delay`` seconds."""

    def on_dead_letter(self, letter: DeadLettered) -> None:
        """A message was moved to the dead letters (by this worker, or by its broker
        consumer when a delivery limit was reached)."""


_HOOKS = ("before_publish", "after_publish", "worker_start", "worker_stop", "before_run",
          "on_partial", "after_run", "on_retry", "on_dead_letter")


class MiddlewareChain:
    """The installed middleware, called hook by hook with each one's failure contained.

    For every hook it keeps only the middleware that override it, so a hook nobody
    overrides is a loop over an empty tuple."""

    def __init__(self, middleware: Sequence[Middleware] = ()) -> None:
        for item in middleware:
            if not isinstance(item, Middleware):
                raise TypeError(f"middleware must be Middleware instances, not "
                                f"{type(item).__name__} {item!r}")
        self.middleware = tuple(middleware)
        self._calls: dict[str, tuple[Callable[..., None], ...]] = {}
        self._index()

    def _index(self) -> None:
        self._calls = {
            hook: tuple(getattr(m, hook) for m in self.middleware
                        if getattr(type(m), hook) is not getattr(Middleware, hook))
            for hook in _HOOKS}

    def add(self, middleware: Middleware) -> None:
        """Append one more, after those given at construction: what ``qtasks worker
        --metrics-port`` does to the app it loaded. Call it before the worker starts (a
        worker reads whether the chain is empty when it starts)."""
        if not isinstance(middleware, Middleware):
            raise TypeError(f"middleware must be Middleware instances, not "
                            f"{type(middleware).__name__} {middleware!r}")
        self.middleware = (*self.middleware, middleware)
        self._index()

    def __bool__(self) -> bool:
        return bool(self.middleware)

    def _call(self, hook: str, *args: Any) -> None:
        for call in self._calls[hook]:
            try:
                call(*args)
            except Exception:
                log.exception("middleware %s failed in %s; ignored",
                              type(getattr(call, "__self__", call)).__name__, hook)

    def before_publish(self, message: TaskMessage) -> None:
        self._call("before_publish", message)

    def after_publish(self, message: TaskMessage) -> None:
        self._call("after_publish", message)

    def worker_start(self, worker: WorkerInfo) -> None:
        self._call("worker_start", worker)

    def worker_stop(self, worker: WorkerInfo) -> None:
        self._call("worker_stop", worker)

    def before_run(self, context: TaskContext) -> None:
        self._call("before_run", context)

    def on_partial(self, context: TaskContext, seq: int, value: Any) -> None:
        if self._calls["on_partial"]:
            self._call("on_partial", context, seq, value)

    def after_run(self, context: TaskContext, outcome: Outcome) -> None:
        self._call("after_run", context, outcome)

    def on_retry(self, context: TaskContext, error: BaseException, delay: float) -> None:
        self._call("on_retry", context, error, delay)

    def on_dead_letter(self, letter: DeadLettered) -> None:
        self._call("on_dead_letter", letter)

    def broker_dead_letter(self, queue: str, reason: DeadLetterReason, detail: str) -> None:
        """What a broker calls when it dead-letters a message on its own."""
        self._call("on_dead_letter", DeadLettered(queue, reason, detail))
