"""What ``add_task()`` of a workflow hands back: a handle that follows its steps by id.

The handle holds the plan and the workflow id, nothing a worker needs. It computes each
step's task ids as the workers do (``qtasks.canvas.wire``) from the finals of the steps
before, and follows every task with the ``Task`` handle (its de-duplicated events) over the
result store, so it works from any process and after the producer that started the
workflow has gone (``QueueTasks.workflow_handle``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from qtasks.canvas.wire import (
    Step,
    check_step,
    derive_id,
    id_ms,
    is_each,
    is_group,
    ms_of,
    step_path,
)
from qtasks.errors import OptionError, TaskFailedError, TaskTimeoutError
from qtasks.protocol import ResultEvent
from qtasks.schema import TaskStatus
from qtasks.task import Restarted, Task

if TYPE_CHECKING:
    from qtasks.runtime import Runtime

#: Where a partial comes from: a step's index; for a group member ``(step, index)`` (a
#: workflow that is one group: the index alone); for a fan-out item ``(step, seq)``.
Tag = int | tuple[int, int]
Emit = Callable[[Tag, Any], None]


class Part(NamedTuple):
    """One partial of one task of a workflow, as ``WorkflowHandle.stream()`` yields it."""

    step: Tag
    value: Any


class WorkflowFailed(TaskFailedError):
    """A task of the workflow ended without success: the workflow stopped there."""

    def __init__(self, workflow: str, step: Tag, task: Task) -> None:
        error = task.error
        detail = f"{error.type}: {error.message}" if error else task.status.value
        super().__init__(f"workflow {workflow} stopped at step {step}: task {task.name} "
                         f"{task.id} ended {task.status.value}: {detail}")
        self.workflow, self.step, self.task = workflow, step, task


class WorkflowTimeoutError(TaskTimeoutError):
    """Waiting for a workflow ran out of time; it goes on. ``waiting_on`` names the
    tasks it was waiting for."""

    def __init__(self, workflow: str, timeout: float | None, waiting_on: list[Task]) -> None:
        super().__init__(workflow, timeout)
        names = ", ".join(f"{t.name} {t.id}" for t in waiting_on[:3]) or "its first step"
        more = f" and {len(waiting_on) - 3} more" if len(waiting_on) > 3 else ""
        self.args = (f"workflow {workflow} did not finish within {timeout} s (it goes on; "
                     f"waiting for {names}{more})",)
        self.waiting_on = waiting_on


class WorkflowHandle:
    """A workflow as its producer (or anyone holding ``to_dict()``) sees it."""

    def __init__(self, runtime: Runtime, workflow: str, plan: list[Step]) -> None:
        self.runtime = runtime
        self.id = workflow
        self.plan = plan
        #: Every task followed so far, by id.
        self.tasks: dict[str, Task] = {}
        #: The ``created_at`` of each final read, by task id: what the ids after it are
        #: made from (as the worker makes them from the same final).
        self._created: dict[str, float | None] = {}

    def to_dict(self) -> dict[str, Any]:
        """What another process needs to follow this workflow (``from_dict``)."""
        return {"id": self.id, "plan": self.plan}

    @classmethod
    def from_dict(cls, runtime: Runtime, data: dict[str, Any]) -> WorkflowHandle:
        """The inverse of ``to_dict`` (``app.workflow_handle(data)``)."""
        if not isinstance(data.get("id"), str) or not isinstance(data.get("plan"), list) \
                or not data["plan"]:
            raise OptionError(f"not a workflow handle's to_dict(): {data!r:.80}")
        try:
            for step in data["plan"]:
                check_step(step)
        except ValueError as exc:
            raise OptionError(f"workflow {data['id']}: {exc}") from None
        return cls(runtime, data["id"], data["plan"])

    async def wait(self, timeout: float | None = None) -> Any:
        """Wait for the end: the last step's ``Task`` (finished) when the workflow ends
        with a task; the list of results, in order, when it ends with a group or a
        fan-out. Raises ``WorkflowFailed`` naming the task whose failure stopped it, and
        ``WorkflowTimeoutError`` (a ``TaskTimeoutError`` naming the workflow and the
        tasks it waited for) when ``timeout`` runs out; the workflow goes on."""
        timer = asyncio.timeout(timeout)
        try:
            async with timer:
                return await self._run(None)
        except TimeoutError:
            if not timer.expired():
                raise
            waiting = [t for t in self.tasks.values() if not t.status.finished]
            raise WorkflowTimeoutError(self.id, timeout, waiting) from None

    async def result(self, timeout: float | None = None) -> Any:
        """The workflow's result: the last task's ``returning``, or the list of a final
        group's or fan-out's results; raises as ``wait`` does."""
        outcome = await self.wait(timeout)
        return outcome.returning if isinstance(outcome, Task) else outcome

    async def stream(self) -> AsyncIterator[Part]:
        """Every partial of every task, tagged with its step, as they arrive (the tasks
        of a group or fan-out run at once, so theirs interleave; ``Restarted`` markers
        between attempts as ``Task.stream`` has them). Ends when the workflow ends;
        ``wait()`` then says how."""
        parts: asyncio.Queue[Part | None] = asyncio.Queue()
        runner = asyncio.create_task(self._run(lambda tag, v: parts.put_nowait(Part(tag, v))))
        runner.add_done_callback(lambda _: parts.put_nowait(None))
        try:
            while (part := await parts.get()) is not None:
                yield part
            with contextlib.suppress(WorkflowFailed):
                runner.result()
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner

    # -- following the plan ---------------------------------------------------------------

    def _task(self, path: str, ms: int, name: str) -> Task:
        task_id = derive_id(self.id, path, ms)
        if task_id not in self.tasks:
            self.tasks[task_id] = Task(id=task_id, name=name, runtime=self.runtime)
        return self.tasks[task_id]

    async def _run(self, emit: Emit | None) -> Any:
        """Follow each unit in turn; the last one's outcome."""
        await self.runtime.start()
        ms, index = id_ms(self.id), 0
        outcome: Task | list[Any] | None = None
        lone_group = len(self.plan) == 1
        while index < len(self.plan):
            step = self.plan[index]
            if is_group(step):
                outcome, ms = await self._group(index, step, ms, emit, lone_group)
                index += 1
            elif index + 1 < len(self.plan) and is_each(self.plan[index + 1]):
                outcome, ms = await self._fan_out(index, step, ms, emit)
                index += 2
            else:
                task = self._task(step_path(index), ms, step["task"])
                await self._follow(task, index, emit)
                self._check(index, task)
                outcome, ms = task, self._ms_after(ms, task)
                index += 1
        return outcome

    async def _follow(self, task: Task, tag: Tag, emit: Emit | None,
                      partial: Callable[[ResultEvent], None] | None = None) -> Task:
        """Every event of ``task`` to its final; its partials to ``emit`` (with a
        ``Restarted`` marker between attempts, as ``Task.stream`` has them) and to
        ``partial``."""
        attempt = 0
        async for event in task.events():
            if event.kind == "final":
                self._created[task.id] = event.created_at
            elif event.kind == "partial" and emit is not None:
                if attempt and event.attempt != attempt:
                    emit(tag, Restarted(event.attempt, task.error))
                attempt = event.attempt
                emit(tag, event.value)
                if partial is not None:
                    partial(event)
        return task

    def _ms_after(self, ms: int, *tasks: Task) -> int:
        """The time of the ids that follow ``tasks``: their finals' latest ``created_at``."""
        return max(ms_of(self._created.get(task.id), ms) for task in tasks)

    def _check(self, tag: Tag, *tasks: Task) -> None:
        for task in tasks:
            if task.status is not TaskStatus.SUCCESS:
                raise WorkflowFailed(self.id, tag, task)

    async def _group(self, index: int, step: Step, ms: int, emit: Emit | None,
                     lone: bool) -> tuple[list[Any], int]:
        members = [self._task(step_path(index, i), ms, member["task"])
                   for i, member in enumerate(step["group"])]
        await asyncio.gather(*(self._follow(task, i if lone else (index, i), emit)
                               for i, task in enumerate(members)))
        for i, task in enumerate(members):
            self._check(i if lone else (index, i), task)
        return [t.returning for t in members], self._ms_after(ms, *members)

    async def _fan_out(self, index: int, step: Step, ms: int,
                       emit: Emit | None) -> tuple[list[Any], int]:
        """The generator at ``index``, and the items of ``index + 1`` its yields started:
        followed as they start when streaming, else once the generator's final says how
        many its last attempt yielded (the items of an earlier attempt are not its)."""
        gen = self._task(step_path(index), ms, step["task"])
        item_ms, name = id_ms(gen.id), self.plan[index + 1]["each"]["task"]
        following: dict[tuple[int, int], asyncio.Task[Task]] = {}

        def item(attempt: int, seq: int) -> Task:
            return self._task(step_path(index + 1, attempt, seq), item_ms, name)

        def started(event: ResultEvent) -> None:
            """A partial of the generator: its item started; followed from now on."""
            key = (event.attempt, event.seq)
            following[key] = asyncio.create_task(self._follow(item(*key), (index + 1,
                                                                           event.seq), emit))

        try:
            await self._follow(gen, index, emit, started)
            self._check(index, gen)
            items = [item(gen.attempt, seq) for seq in range(gen.partials)]
            await asyncio.gather(*(following.get((gen.attempt, seq))
                                   or self._follow(task, (index + 1, seq), emit)
                                   for seq, task in enumerate(items)))
        finally:
            for follower in following.values():
                follower.cancel()  # those of an attempt that failed, or all on an error
        for seq, task in enumerate(items):
            self._check((index + 1, seq), task)
        return [t.returning for t in items], self._ms_after(ms, gen, *items)
