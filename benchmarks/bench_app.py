"""The app the benchmark's worker processes run (``python -m qtasks worker
benchmarks.bench_app:app``) and its producers import.

Its broker and result store come from ``QTASKS_BROKER_URL`` / ``QTASKS_RESULTS_URL`` (the
harness gives each measurement URLs with its own ``prefix``); unset, it is ``memory://``
with an embedded worker, which ``BENCH_EMBEDDED_WORKER=0`` turns off (to measure enqueueing
alone).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

from qtasks import QueueTasks

app = QueueTasks(embedded_worker=False if os.environ.get("BENCH_EMBEDDED_WORKER") == "0"
                 else None)


@app.task
async def noop() -> None:
    """Nothing: the cost of a task is the framework's."""


@app.task
async def burst(n: int) -> AsyncIterator[float]:
    """Yields its own ``time.time()`` ``n`` times as fast as the worker takes them, never
    awaiting in between: the burst whose partials must not be held back by batching."""
    for _ in range(n):
        yield time.time()


@app.task
async def stamps(n: int, rate: float) -> AsyncIterator[float]:
    """Yields its own ``time.time()`` ``n`` times, paced at ``rate`` yields/s."""
    start = time.monotonic()
    for i in range(n):
        wait = start + i / rate - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        yield time.time()
