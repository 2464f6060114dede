"""Rate limits (``@app.task(rate_limit=...)``): a worker spaces a limited task's starts by
handing it back to the broker, and an unlimited task goes by meanwhile."""

from __future__ import annotations

import time

from qtasks import TaskStatus
from tests.contract.support import DEADLINE, Backend, running_worker


async def _stamp(i: int) -> float:
    return time.time()


class RateLimitContract:
    async def test_a_rate_limited_task_is_spaced_and_holds_up_nothing(
            self, backend: Backend) -> None:
        producer, worker_app = backend.app(), backend.app()
        worker_app.task(name="limited_stamp", rate_limit="20/s")(_stamp)
        n = 12
        async with running_worker(worker_app, concurrency=2) as worker:
            limited = [await producer.send_task("limited_stamp", [i]) for i in range(n)]
            free = await producer.add_task("add", 1, 2, timeout=DEADLINE)
            free_done = time.time()
            done = [await task.wait(DEADLINE) for task in limited]
        assert all(task.status == TaskStatus.SUCCESS for task in done)
        starts = sorted(task.returning for task in done)
        assert (n - 1) / 20 * 0.95 <= starts[-1] - starts[0] <= (n - 1) / 20 * 1.5 + 1.0
        assert free.returning == 3 and free_done < starts[-1]  # not behind their slots
        assert worker.limiter.handed_back >= n // 2  # they waited in the broker
