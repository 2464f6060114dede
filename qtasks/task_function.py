"""``TaskFunction``: what ``@app.task`` puts in place of a function.

It knows its app only as something that enqueues by name (``Enqueuer``), so it sits
below the app and the app imports it, not the other way round.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from qtasks.canvas.signature import TaskSignatures
from qtasks.schema import TaskExecSchema
from qtasks.task import Task


class Enqueuer(Protocol):
    """What a ``TaskFunction`` needs of its app: ``QueueTasks``'s two ways to enqueue by
    name (``add_task(name, *args, **kwargs)``, ``send_task(name, args, kwargs,
    **options)``)."""

    @property
    def add_task(self) -> Callable[..., Awaitable[Task]]: ...

    @property
    def send_task(self) -> Callable[..., Awaitable[Task]]: ...


class TaskFunction(TaskSignatures):
    """The object ``@app.task`` puts in place of the function.

    Calling it runs the function here, as if undecorated; ``add_task`` runs it on a worker.
    """

    def __init__(self, app: Enqueuer, schema: TaskExecSchema) -> None:
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

    async def add_task(self, *args: Any, timeout: float | None = None,
                       priority: int | None = None, delay: float | None = None,
                       task_id: str | None = None, **kwargs: Any) -> Task:
        """Enqueue a run; see ``QueueTasks.add_task``."""
        return await self.app.add_task(self.schema.name, *args, timeout=timeout,
                                       priority=priority, delay=delay, task_id=task_id,
                                       **kwargs)

    async def apply_async(self, args: Sequence[Any] = (),
                          kwargs: Mapping[str, Any] | None = None, **options: Any) -> Task:
        """Enqueue a run with the arguments apart from the options (Celery's shape); see
        ``QueueTasks.send_task``."""
        return await self.app.send_task(self.schema.name, args, kwargs, **options)

    def __repr__(self) -> str:
        return f"<TaskFunction {self.schema.name}>"
