"""The blocking face of an app, for code without an event loop (Flask, Django, scripts).

There is no second implementation here: each call is the async API's coroutine, run on
one event loop that lives in a daemon thread of its own. The loop owns the app's
connections, so an app used through ``app.sync`` must not also be used from another loop.
Every method may be called from many threads at once (``run_coroutine_threadsafe`` is
thread-safe, and the async API is safe for concurrent coroutines).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, Protocol, TypeVar

from qtasks.interfaces import close_iterator
from qtasks.protocol import ResultEvent
from qtasks.task import Task

T = TypeVar("T")


class AsyncApp(Protocol):
    """What the blocking face drives: the async API of ``QueueTasks`` (which builds its
    ``SyncApp``, so this module does not import it)."""

    async def add_task(self, task_name: str, *args: Any, **options: Any) -> Task: ...

    async def get(self, task_id: str) -> Task | None: ...

    async def cancel(self, task_id: str, reason: str = "") -> None: ...

    def task_handle(self, task_id: str, task_name: str = "") -> Task: ...

    async def subscribe(self, task_name: str = "*") -> AsyncIterator[ResultEvent]: ...

    async def close(self) -> None: ...


class SyncApp:
    """``app.sync``: enqueue, wait, stream, listen and cancel without ``await``."""

    def __init__(self, app: AsyncApp) -> None:
        self.app = app
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="qtasks-sync-loop")
        self._thread.start()

    def run(self, awaitable: Awaitable[T], timeout: float | None = None) -> T:
        """Run one coroutine on the app's loop and block for its result, with the calling
        thread's context variables: what the caller made current (an OpenTelemetry span
        that a traced publish takes as its parent, say) is current in the coroutine too."""
        caller = contextvars.copy_context()

        async def call() -> T:
            for variable, value in caller.items():  # in this task's own context only
                variable.set(value)
            return await awaitable
        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout)

    def iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        """Step an async iterator on the app's loop, one blocking ``next`` at a time."""
        try:
            while True:
                try:
                    yield self.run(anext(iterator))
                except StopAsyncIteration:
                    return
        finally:
            if self._loop.is_running():
                self.run(close_iterator(iterator))

    def add_task(self, task_name: str, *args: Any, **options: Any) -> SyncTask:
        """``QueueTasks.add_task``, blocking; with ``timeout=`` it waits for the end."""
        task = self.run(self.app.add_task(task_name, *args, **options))
        return SyncTask(task, self)

    def get(self, task_id: str) -> SyncTask | None:
        task = self.run(self.app.get(task_id))
        return None if task is None else SyncTask(task, self)

    def cancel(self, task_id: str, reason: str = "") -> None:
        self.run(self.app.cancel(task_id, reason))

    def task_handle(self, task_id: str, task_name: str = "") -> SyncTask:
        return SyncTask(self.app.task_handle(task_id, task_name), self)

    def listen(self, task_name: str = "*") -> Iterator[ResultEvent]:
        """Live events of every run of ``task_name``; subscribed when this returns."""
        events = self.run(self.app.subscribe(task_name))
        return self.iterate(events)

    def close(self) -> None:
        """Disconnect and stop the loop thread."""
        if not self._loop.is_running():
            return
        self.run(self.app.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class SyncTask:
    """A ``Task`` whose ``wait`` and ``stream`` block; its fields read through."""

    def __init__(self, task: Task, client: SyncApp) -> None:
        self.task = task
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def wait(self, timeout: float | None = None) -> SyncTask:
        self._client.run(self.task.wait(timeout))
        return self

    def result(self, timeout: float | None = None) -> Any:
        return self._client.run(self.task.result(timeout))

    def cancel(self, reason: str = "") -> None:
        self._client.run(self.task.cancel(reason))

    def stream(self) -> Iterator[Any]:
        return self._client.iterate(self.task.stream())

    def __repr__(self) -> str:
        return f"Sync{self.task!r}"
