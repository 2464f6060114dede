"""The app the periodic-task and rate-limit integration tests run in CLI processes
(``qtasks beat``, ``qtasks worker``); URLs from ``QTASKS_BROKER_URL``/``QTASKS_RESULTS_URL``."""

from __future__ import annotations

import os
import time

from qtasks import QueueTasks, current_task

app = QueueTasks()
#: Seconds between two ticks of the test schedule.
EVERY = float(os.environ.get("QTASKS_TEST_EVERY", "0.5"))
SCHEDULE = "test-ticks"


@app.task
async def beat_tick() -> str | None:
    """Run by each tick: returns the tick (the header the beat set), for the test to
    count runs per tick."""
    return current_task().headers.get("qtasks-tick")


@app.task
async def sentinel() -> float:
    """Sent after the beats stopped: with one worker of concurrency 1, its final comes
    after every tick enqueued before it."""
    return time.time()


@app.task(rate_limit="20/s")
async def limited_stamp(i: int) -> float:
    return time.time()


@app.task
async def free_stamp() -> float:
    return time.time()


app.periodic(beat_tick, every=EVERY, name=SCHEDULE)
