"""The task messages that start one unit of a workflow (a task, the members of a group,
the items of a fan-out), as the producer starts the first and a worker every later one.

One builder for both, so that a step's id, arguments and header are the same whoever
starts it: the producer publishes through ``send_task`` (which connects, starts an
embedded worker and gets its reply address), a worker through ``Runtime.publish``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from qtasks.canvas.handle import WorkflowHandle
from qtasks.canvas.wire import (
    FLOW_HEADER,
    Flow,
    Step,
    derive_id,
    id_ms,
    is_each,
    is_group,
    new_claim,
    step_path,
)
from qtasks.protocol import TaskMessage, uuid7

if TYPE_CHECKING:
    from qtasks.runtime import Runtime
    from qtasks.task import Task


class WorkflowApp(Protocol):
    """What starting a workflow needs of a ``QueueTasks`` app."""

    @property
    def runtime(self) -> Runtime: ...

    async def send_task(self, task_name: str, args: Sequence[Any] = (),
                        kwargs: Mapping[str, Any] | None = None, *,
                        timeout: float | None = None, priority: int | None = None,
                        delay: float | None = None, task_id: str | None = None,
                        queue: str | None = None, max_time: float | None = None,
                        headers: dict[str, str] | None = None) -> Task: ...


def step_message(step: Step, task_id: str, inputs: tuple[Any, ...], flow: Flow,
                 now: float, default_queue: str) -> TaskMessage:
    """The message of one task of a workflow: ``inputs`` (the previous result, or a
    yielded value) before the step's own arguments, its options, and its flow header."""
    options: dict[str, Any] = step.get("options") or {}
    delay = options.get("delay")
    headers = {**(options.get("headers") or {}), FLOW_HEADER: flow.to_header()}
    return TaskMessage(
        id=task_id, task=step["task"], args=[*inputs, *step.get("args", [])],
        kwargs=dict(step.get("kwargs") or {}), queue=options.get("queue") or default_queue,
        priority=options.get("priority") or 0, created_at=now,
        max_time=options.get("max_time"), not_before=now + delay if delay else None,
        headers=headers)


def unit_messages(workflow: str, index: int, steps: Sequence[Step], inputs: tuple[Any, ...],
                  ms: int, *, claim: bool, default_queue: str) -> list[TaskMessage]:
    """The messages that start the unit at ``steps[0]`` (plan index ``index``), whose ids
    have ``ms`` as their time: one for a task (carrying the ``each`` step after it, if
    any), one per member for a group. ``claim``: a token per message (a worker's)."""
    now = time.time()
    step, rest = steps[0], list(steps[1:])
    if is_group(step):
        members = step["group"]
        return [step_message(member, derive_id(workflow, step_path(index, i), ms), inputs,
                             Flow(workflow, index, ms, rest, member=(i, len(members)),
                                  claim=new_claim() if claim else None),
                             now, default_queue)
                for i, member in enumerate(members)]
    each = None
    if rest and is_each(rest[0]):
        each, rest = rest[0]["each"], rest[1:]
    flow = Flow(workflow, index, ms, rest, each=each, claim=new_claim() if claim else None)
    return [step_message(step, derive_id(workflow, step_path(index), ms), inputs, flow, now,
                         default_queue)]


async def start_workflow(app: WorkflowApp, plan: list[Step]) -> WorkflowHandle:
    """Publish the first unit of ``plan`` under a new workflow id; a handle on it all."""
    workflow = uuid7()
    runtime = app.runtime
    messages = unit_messages(workflow, 0, plan, (), id_ms(workflow), claim=False,
                             default_queue=runtime.default_queue)
    await asyncio.gather(*(app.send_task(
        m.task, m.args, m.kwargs, task_id=m.id, queue=m.queue, priority=m.priority,
        max_time=m.max_time, headers=m.headers,
        delay=max(0.0, m.not_before - m.created_at) if m.not_before else None)
        for m in messages))
    return WorkflowHandle(runtime, workflow, plan)
