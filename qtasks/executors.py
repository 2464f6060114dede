"""How a task's function is run: on the event loop or in a thread, as a plain call or as
a generator whose every yield is published at once.

``execute()`` takes the ``generating`` path to ``run_task_gen()``, else ``run_task()``.
``run_task_gen()`` sends each yielded value through ``emit()``, which applies the task's
``generate_handler``, publishes the handled value as a partial result and returns it; the
handled values, in order, become ``returning``. The loop is written once, in the base
class: the two executors differ only in how they call the function (``run_task``) and how
they step a generator (``iterate``).

Replace either per task (``@app.task(executor=MyExecutor)``) or for the whole app
(``QueueTasks(executor=MyExecutor)``). A replacement that overrides ``run_task_gen`` keeps
streaming by calling ``await self.emit(value)`` for each value it wants published.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from typing import Any

from qtasks.interfaces import close_iterator
from qtasks.schema import PublishPartial, TaskExecSchema


class BaseTaskExecutor:
    """Runs one call of a task. One instance per run: it may keep per-run state."""

    def __init__(
        self,
        schema: TaskExecSchema,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        publish: PublishPartial | None = None,
        thread_pool: Executor | None = None,
    ) -> None:
        self.schema = schema
        self.args = tuple(args)
        self.kwargs = kwargs or {}
        self.publish = publish
        self.thread_pool = thread_pool

    async def execute(self) -> Any:
        if self.schema.generating:
            return await self.run_task_gen()
        return await self.run_task()

    async def run_task(self) -> Any:
        """Call a plain function and return its result (each executor knows how)."""
        raise NotImplementedError(f"{type(self).__name__} must define run_task")

    def iterate(self) -> AsyncIterator[Any]:
        """The generator's raw yields, as an async iterator."""
        raise NotImplementedError(f"{type(self).__name__} must define iterate")

    async def run_task_gen(self) -> list[Any]:
        results: list[Any] = []
        iterator = self.iterate()
        try:
            async for value in iterator:
                results.append(await self.emit(value))
        finally:
            await close_iterator(iterator)
        return results

    async def emit(self, value: Any) -> Any:
        """Handle one yielded value and publish it as a partial result; return it handled."""
        handler = self.schema.generate_handler
        if handler is not None:
            value = handler(value)
            if inspect.isawaitable(value):
                value = await value
        if self.publish is not None:
            await self.publish(value)
        return value

    async def in_thread(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run blocking code off the loop, so one sync task never stalls the others."""
        loop = asyncio.get_running_loop()
        # In a copy of the task's context, so qtasks.current_task() works in the thread.
        call = functools.partial(contextvars.copy_context().run, func, *args, **kwargs)
        return await loop.run_in_executor(self.thread_pool, call)


class AsyncTaskExecutor(BaseTaskExecutor):
    """For ``async def`` functions and async generators: run on the event loop."""

    async def run_task(self) -> Any:
        return await self.schema.func(*self.args, **self.kwargs)

    def iterate(self) -> AsyncIterator[Any]:
        iterator: AsyncIterator[Any] = self.schema.func(*self.args, **self.kwargs)
        return iterator


_DONE = object()


def _step(generator: Iterator[Any]) -> Any:
    # StopIteration cannot cross a Future, so the end is signalled with a sentinel.
    try:
        return next(generator)
    except StopIteration:
        return _DONE


class SyncTaskExecutor(BaseTaskExecutor):
    """For ``def`` functions and generators: every call and every ``next()`` in a thread."""

    async def run_task(self) -> Any:
        return await self.in_thread(self.schema.func, *self.args, **self.kwargs)

    def iterate(self) -> AsyncIterator[Any]:
        return self._steps(self.schema.func(*self.args, **self.kwargs))

    async def _steps(self, generator: Iterator[Any]) -> AsyncIterator[Any]:
        try:
            while (value := await self.in_thread(_step, generator)) is not _DONE:
                yield value
        finally:
            close = getattr(generator, "close", None)
            if close is not None:
                with contextlib.suppress(ValueError):  # "generator already executing"
                    close()


def default_executor(schema: TaskExecSchema) -> type[BaseTaskExecutor]:
    return AsyncTaskExecutor if schema.awaiting else SyncTaskExecutor
