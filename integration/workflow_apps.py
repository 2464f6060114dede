"""The app CLI worker processes run in the workflow crash scenarios
(``integration/test_workflow_crashes.py``).

Every run of a task leaves a marker file in ``QTASKS_TEST_DIR`` (``run-<label>-<random>``,
holding the pid), so a test counts from outside how often each step ran and where. With
``QTASKS_TEST_DIE=<when>:<task>`` a worker kills itself (SIGKILL, no clean-up) when it
publishes a message of ``<task>``: ``before`` the publish or right ``after`` it, which
for a continuation is between the step's durable final and its ack. Only the first
worker to get there dies (a ``died`` marker, created exclusively), so the next one goes
through.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

from qtasks import Middleware, QueueTasks, TaskMessage

#: The queue of the fan-out's generator: a worker of its own runs it, so that killing
#: that worker kills the generator and no item.
GENERATOR_QUEUE = "flowgen"


def _directory() -> Path:
    return Path(os.environ["QTASKS_TEST_DIR"])


def mark(name: str) -> None:
    """Leave ``name`` in the test's directory with this process's pid (written aside,
    then renamed: a test never reads a marker without its content)."""
    partial = _directory() / f".{name}.tmp"
    partial.write_text(str(os.getpid()))
    os.replace(partial, _directory() / name)


def mark_run(label: str) -> None:
    mark(f"run-{label}-{uuid.uuid4().hex[:8]}")


class DieWhenPublishing(Middleware):
    """Kill this process around the publish of one task's message, once per test."""

    def __init__(self, spec: str) -> None:
        self.when, _, self.task = spec.partition(":")

    def _die(self, message: TaskMessage, when: str) -> None:
        if when != self.when or message.task != self.task:
            return
        try:
            fd = os.open(_directory() / "died", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # another worker died here already: this one goes through
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)

    def before_publish(self, message: TaskMessage) -> None:
        self._die(message, "before")

    def after_publish(self, message: TaskMessage) -> None:
        self._die(message, "after")


_die = os.environ.get("QTASKS_TEST_DIE")
app = QueueTasks(middleware=[DieWhenPublishing(_die)] if _die else [])


@app.task
async def flow_step(value: int, label: str, seconds: float = 0.0) -> int:
    """A chain's step: ``value + 1`` after ``seconds``."""
    mark_run(label)
    await asyncio.sleep(seconds)
    return value + 1


@app.task
async def flow_member(value: int, spacing: float = 0.0) -> int:
    """``value`` squared, after ``value * spacing`` seconds: with a spacing, members end
    one by one and only the last finds the group complete."""
    mark_run(f"member{value}")
    await asyncio.sleep(value * spacing)
    return value * value


@app.task
async def flow_body(values: list[int]) -> int:
    mark_run("body")
    return sum(values)


@app.task(queue=GENERATOR_QUEUE)
async def flow_chunks(count: int, pause: float):  # type: ignore[no-untyped-def]
    """Yields 0 … count-1, ``pause`` seconds apart; ``yielded-<i>`` once value i and its
    item were published (the generator goes on only then)."""
    mark_run("chunks")
    for i in range(count):
        yield i
        mark(f"yielded-{i}-{uuid.uuid4().hex[:8]}")
        await asyncio.sleep(pause)


@app.task
async def flow_item(value: int) -> int:
    mark_run(f"item{value}")
    return value * 10
