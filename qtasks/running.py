"""What one attempt says while it runs: its ``running`` status, sent when worth sending,
and the ``ErrorInfo`` of what ended it. Kept apart from the worker, which only schedules
attempts, so that each reads in one sitting."""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import orjson

from qtasks.errors import MessageEncodeError, UnknownTaskError
from qtasks.interfaces import Delivery, ResultStore
from qtasks.protocol import ErrorInfo, ResultEvent, ResultKind, TaskMessage, encode
from qtasks.schema import TaskStatus

log = logging.getLogger(__name__)
#: One INFO line per finished task (id, name, status, duration); ``qtasks worker --quiet``
#: raises this logger to WARNING.
task_log = logging.getLogger("qtasks.worker.tasks")


#: A task still running after this many seconds (or yielding before) is announced with
#: a ``running`` status. Quicker tasks go straight to their final: one result message
#: instead of two, which on a broker with confirms nearly doubles throughput for short
#: tasks (benchmarks/README.md). Celery does not report STARTED at all by default.
RUNNING_AFTER = 0.05

#: Arguments up to this many bytes (encoded) ride in the ``running`` status and the
#: final, so that a reader holding only the task's id (the dashboard's task page) can show
#: what the run was called with; larger ones are left out rather than copied into every
#: result of the task. Measured once per attempt with orjson (well under a microsecond
#: for the usual few arguments).
ARGUMENTS_SHOWN = 4096


def shown_arguments(message: TaskMessage) -> tuple[list[Any] | None, dict[str, Any] | None]:
    """The arguments a result event carries: all of them, or none (over the limit)."""
    if not message.args and not message.kwargs:
        return [], {}
    if len(orjson.dumps((message.args, message.kwargs))) > ARGUMENTS_SHOWN:
        return None, None
    return message.args, message.kwargs


class RunningStatus:
    """The ``running`` status of one attempt, published when it becomes worth sending.

    Sent at most once: by a timer after ``after`` seconds, or at once before the first
    partial (readers always see ``running`` before any partial). ``settle`` before the
    final cancels a timer that has not fired and waits for a publish under way, so the
    final never overtakes it; a failed publish raises there, as any result publish would.
    """

    def __init__(self, publish: Callable[[], Awaitable[None]], after: float) -> None:
        self._publish = publish
        self._sent: asyncio.Future[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(after, self._send)

    def _send(self) -> asyncio.Future[None]:
        if self._sent is None:
            self._timer.cancel()
            self._sent = asyncio.ensure_future(self._publish())
            # Retrieved here in case nobody awaits it (``cancel`` after a failure).
            self._sent.add_done_callback(lambda f: f.cancelled() or f.exception())
        return self._sent

    async def announce(self) -> None:
        await asyncio.shield(self._send())

    async def settle(self) -> None:
        """Before the final: a status not published is logged, not raised. It is not the
        durable result (the final carries ``started_at`` and ``worker`` too), and raising
        would send back, to run again, a task that has already run."""
        self._timer.cancel()
        if self._sent is not None:
            try:
                await asyncio.shield(self._sent)
            except Exception as exc:
                log.warning("the running status was not published (%s: %s)",
                            type(exc).__name__, exc)

    def cancel(self) -> None:
        """The attempt ends without a final (the worker stops): no late publish."""
        self._timer.cancel()
        if self._sent is not None and not self._sent.done():
            self._sent.cancel()


def error_info(exc: BaseException) -> ErrorInfo:
    """Why an attempt failed, as its final carries it: type, message, traceback."""
    return ErrorInfo(
        type=type(exc).__qualname__,
        message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
    )


class AttemptReport:
    """The result events of a worker's attempts: each says which task, attempt and worker
    it is about, and the final is published (durably) before its message is settled."""

    def __init__(self, results_store: ResultStore, worker: str) -> None:
        self.results_store = results_store
        self.worker = worker
        #: Starts what follows a task's final in a workflow (``qtasks.canvas.advance``),
        #: after that final is durable and before the message is settled.
        self.advance: Callable[[TaskMessage, ResultEvent], Awaitable[None]] | None = None

    def event(self, kind: ResultKind, message: TaskMessage, started_at: float) -> ResultEvent:
        """What every result event of this attempt says about it."""
        args, kwargs = shown_arguments(message)
        return ResultEvent(kind=kind, id=message.id, task=message.task,
                           attempt=message.attempt, started_at=started_at, worker=self.worker,
                           created_at=message.created_at or None, args=args, kwargs=kwargs)

    async def publish(self, event: ResultEvent, reply_to: str | None) -> None:
        await self.results_store.publish(event, encode(event), reply_to)

    async def finish(self, delivery: Delivery, message: TaskMessage, base: ResultEvent,
                     status: TaskStatus, returning: Any, error: ErrorInfo | None,
                     ttl: float | None = None,
                     settle: Callable[[], Awaitable[None]] | None = None) -> None:
        """Publish the final (durable; readable for ``ttl`` seconds when set), then settle
        the message (``ack`` by default), then log the one line of the finished task."""
        now = time.time()
        final = replace(base, kind="final", status=status.value, returning=returning,
                        error=error, finished_at=now, ts=now,
                        expires_at=None if ttl is None else now + ttl)
        try:
            body = encode(final)
        except MessageEncodeError as exc:
            final = replace(final, status=TaskStatus.ERROR.value, returning=None,
                            error=error_info(exc))
            body = encode(final)
        await self.results_store.publish(final, body, message.headers.get("reply_to"))
        await self.conclude(delivery, message, final, settle)
        task_log.info("%s %s %s in %.3f s", message.task, message.id, final.status,
                      now - (base.started_at or now))

    async def conclude(self, delivery: Delivery, message: TaskMessage, final: ResultEvent,
                       settle: Callable[[], Awaitable[None]] | None = None) -> None:
        """The final is durable (just published, or found stored by a redelivery): start
        what follows it in a workflow, then settle the message (``ack`` by default). One
        path for both, so a worker killed between the two loses no continuation."""
        if self.advance is not None:
            await self.advance(message, final)
        await (settle or delivery.ack)()

    async def unknown_task(self, delivery: Delivery, message: TaskMessage) -> None:
        """A task this worker does not know: its submitter gets an ``error`` final at once
        (rather than waiting out its timeout), and the message is kept as a dead letter, to
        be requeued once a worker that knows the task is deployed."""
        reason = f"unknown task: {message.task!r}"
        log.error("dead-lettering task %s: %s", message.id, reason)
        error = error_info(UnknownTaskError(
            f"no task named {message.task!r} is registered on worker {self.worker} (queue "
            f"{message.queue!r}); the message is kept as a dead letter"))
        base = self.event("final", message, time.time())
        try:
            await self.finish(delivery, message, base, TaskStatus.ERROR, None, error,
                              settle=lambda: delivery.dead_letter(reason))
        except Exception as exc:  # telling the submitter is best effort; keeping it is not
            log.error("could not publish the error of task %s %s: %s", message.task,
                      message.id, exc)
            await delivery.dead_letter(reason)
