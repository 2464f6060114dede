"""The running task's context: which task, attempt and worker the code running now serves.

A task reads it with ``qtasks.current_task()``; middleware receives the same object in
its hooks. It lives in a ``contextvars.ContextVar`` set in the asyncio task that runs
the attempt, so concurrent tasks on one worker never see each other's context; sync
tasks see it too, because their threads run in a copy of that context.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from qtasks.protocol import TaskMessage


@dataclass(slots=True)
class TaskContext:
    """One attempt of one task, as the worker runs it."""

    #: The task's id (the same across its attempts).
    id: str
    #: The registered task name.
    name: str
    #: 1 for the first run, 2 for the first retry, and so on.
    attempt: int
    #: The queue the message came from.
    queue: str
    #: The message's headers (``traceparent``, ``reply_to`` …), as sent.
    headers: dict[str, str]
    #: The name of the worker running it (``host:pid:suffix`` unless named).
    worker: str
    #: When this attempt started (``time.time()``).
    started_at: float
    #: The task message itself, for middleware that needs more (``created_at`` …).
    message: TaskMessage
    #: Scratch space for middleware, per attempt (a span, a start time …): keyed by
    #: whatever each middleware chooses, so that two never clash.
    state: dict[Any, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, message: TaskMessage, worker: str, started_at: float) -> TaskContext:
        return cls(id=message.id, name=message.task, attempt=message.attempt,
                   queue=message.queue, headers=message.headers, worker=worker,
                   started_at=started_at, message=message)


_current: ContextVar[TaskContext | None] = ContextVar("qtasks_current_task", default=None)


def current_task() -> TaskContext:
    """The context of the task running now, in its own code (async or sync, generator or
    not). Outside a task it raises ``RuntimeError``, rather than returning a context that
    belongs to no task."""
    context = _current.get()
    if context is None:
        raise RuntimeError("qtasks.current_task() was called outside a running task")
    return context


def enter(context: TaskContext) -> None:
    """Make ``context`` current in the calling asyncio task (the worker's handler task,
    which is its own context: setting it here leaks into no other task)."""
    _current.set(context)
