"""What ``add_task`` hands back: ``Task``, one run of a task as its submitter (or anyone
holding its id) sees it, and the ``Restarted`` marker its stream yields between attempts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from qtasks.errors import ConfigurationError, TaskFailedError, TaskTimeoutError
from qtasks.interfaces import close_iterator
from qtasks.protocol import ErrorInfo, PartialOrder, ResultEvent
from qtasks.runtime import Runtime
from qtasks.schema import TaskStatus


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
    runtime: Runtime | None = field(default=None, repr=False, compare=False)

    def _bound(self) -> Runtime:
        if self.runtime is None:
            raise ConfigurationError(
                f"task {self.id} is not bound to an app: use app.task_handle(id)")
        return self.runtime

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
        latest = PartialOrder()
        events = self._bound().results_store.watch(self.id)
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
        timer = asyncio.timeout(timeout)
        latest = PartialOrder()
        events = self._bound().results_store.watch(self.id)
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
        await self._bound().cancel(self.id, reason)

    async def result(self, timeout: float | None = None) -> Any:
        """``returning`` once the task succeeded; raises ``TaskFailedError`` otherwise."""
        await self.wait(timeout)
        if self.status is not TaskStatus.SUCCESS:
            err = self.error
            detail = f"{err.type}: {err.message}" if err else self.status.value
            raise TaskFailedError(f"task {self.name} {self.id} ended {self.status.value}: {detail}")
        return self.returning

