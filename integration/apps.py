"""The app that CLI worker processes in the integration tests run.

Its broker and result store come from ``QTASKS_BROKER_URL`` / ``QTASKS_RESULTS_URL`` (each
test gives URLs with its own namespace). Markers in ``QTASKS_TEST_DIR`` let a test see,
from outside, which process started a task.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from qtasks import QueueTasks, current_task

app = QueueTasks()


def _mark(name: str) -> None:
    directory = os.environ.get("QTASKS_TEST_DIR")
    if directory:
        # Written aside, then renamed: a test never sees a marker without its content.
        partial = Path(directory, f".{name}.tmp")
        partial.write_text(str(os.getpid()))
        os.replace(partial, Path(directory, name))


@app.task
async def whoami(pause: float = 0.0) -> int:
    """Which worker process ran it; ``pause`` keeps it busy so the load spreads."""
    await asyncio.sleep(pause)
    return os.getpid()


@app.task
async def add(a: int, b: int) -> int:
    return a + b


@app.task
async def countdown(n: int, pause: float = 0.0):  # type: ignore[no-untyped-def]
    """Yields n-1 ... 0 with ``pause`` between yields."""
    for i in reversed(range(n)):
        yield i
        await asyncio.sleep(pause)


@app.task
async def say(*values: object):  # type: ignore[no-untyped-def]
    """Yields each of ``values`` in turn: what a test wants a reader to show."""
    for value in values:
        yield value


@app.task(retry=2, retry_backoff=0.1)
async def flaky(fails: int):  # type: ignore[no-untyped-def]
    """Yields its attempt number, then fails if that is ``fails`` or less: retried, so
    its readers see attempts."""
    attempt = current_task().attempt
    yield attempt
    if attempt <= fails:
        raise RuntimeError(f"attempt {attempt} fails")


@app.task
async def long_task(tag: str, seconds: float) -> str:
    """Leaves a ``started-<tag>`` marker with its pid, then runs ``seconds``."""
    _mark(f"started-{tag}-{os.getpid()}")
    await asyncio.sleep(seconds)
    return f"{tag} done by {os.getpid()}"


@app.task
def sync_sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task(queue="reports")
async def report(name: str) -> str:
    """On a second queue: run only by workers started with ``--queues ...,reports``."""
    return f"report {name} by {os.getpid()}"


#: The marker (in ``QTASKS_TEST_DIR``) that lets ``gated_countdown`` go on; ``open_gate``.
GATE = "gate-open"


def open_gate(directory: Path) -> None:
    """Let the ``gated_countdown`` of the workers writing to ``directory`` go on."""
    partial = directory / f".{GATE}.tmp"
    partial.write_text("open")
    os.replace(partial, directory / GATE)


@app.task
async def gated_countdown(n: int):  # type: ignore[no-untyped-def]
    """Yields n-1, waits for the ``GATE`` marker, then yields n-2 ... 0: what a test checks
    between two yields (a listener has the first, the state is RUNNING) cannot race the
    next one, however loaded the machine. Bounded: a gate never opened fails the task."""
    gate = Path(os.environ["QTASKS_TEST_DIR"], GATE)
    for i in reversed(range(n)):
        yield i
        if i == n - 1:
            async with asyncio.timeout(120):
                while not gate.exists():  # noqa: ASYNC110, ASYNC240
                    await asyncio.sleep(0.02)  # another process: only a file to watch
