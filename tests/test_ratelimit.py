"""Rate limits (``@app.task(rate_limit=...)``) on the memory backends: the rate strings,
the start slots with a clock of the test's own, and a worker that spaces a task's starts
while other tasks go by."""

from __future__ import annotations

import asyncio
import time

import pytest

from qtasks import ConfigurationError, QueueTasks
from qtasks.interfaces import Delivery
from qtasks.ratelimit import RateLimit, RateLimiter, parse_rate


@pytest.mark.parametrize(("text", "count", "per"), [
    ("100/s", 100, 1), ("10/m", 10, 60), ("1/h", 1, 3600), (" 2.5 / s ", 2.5, 1)])
def test_rate_strings(text: str, count: float, per: float) -> None:
    limit = parse_rate(text)
    assert limit is not None and (limit.count, limit.per) == (count, per)
    assert limit.interval == pytest.approx(per / count)


@pytest.mark.parametrize("bad", ["100", "100/x", "0/s", "-1/s", "/s", "ten/m", "1e3/s",
                                 "100/sec", "", 100, 1.5, b"1/s", "inf/s"])
def test_bad_rate_strings_are_refused_at_declaration(bad: object) -> None:
    app = QueueTasks()
    with pytest.raises(ConfigurationError, match=r"rate_limit must be a string like '100/s'"):
        app.task(rate_limit=bad)(lambda: None)  # type: ignore[arg-type]
    assert not app.registry  # nothing half-declared


def test_no_rate_limit_by_default() -> None:
    app = QueueTasks()

    @app.task(rate_limit="3/m")
    def limited() -> None: ...

    @app.task
    def free() -> None: ...

    assert app.registry["limited"].rate_limit == RateLimit(3, 60, "3/m")
    assert app.registry["free"].rate_limit is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_slots_are_one_interval_apart_and_kept_for_their_message() -> None:
    clock = Clock()
    limiter = RateLimiter(clock, park=0.0)
    limit = RateLimit(2, 1, "2/s")
    assert limiter.wait("t", limit, ("a", 1)) == 0  # a free slot: now
    assert limiter.wait("t", limit, ("b", 1)) == pytest.approx(0.5)  # kept for b
    assert limiter.wait("t", limit, ("c", 1)) == pytest.approx(1.0)  # kept for c
    assert limiter.wait("other", limit, ("x", 1)) == 0  # each task name its own
    clock.now += 0.5
    assert limiter.wait("t", limit, ("b", 1)) == 0  # b back on time: its slot
    assert limiter.wait("t", limit, ("d", 1)) == pytest.approx(1.0)  # after c's
    assert limiter.wait("t", limit, ("c", 1)) == pytest.approx(0.5)  # c back early: again
    clock.now += 0.5
    assert limiter.wait("t", limit, ("c", 1)) == 0


def test_a_slot_whose_message_is_late_goes_to_the_next_one() -> None:
    clock = Clock()
    limiter = RateLimiter(clock, park=0.0)
    limit = RateLimit(1, 1, "1/s")
    limiter.wait("t", limit, ("a", 1))
    assert limiter.wait("t", limit, ("b", 1)) == pytest.approx(1.0)
    clock.now += 1.1  # b's slot is due; within its tolerance it stays b's
    assert limiter.wait("t", limit, ("c", 1)) == pytest.approx(0.9)
    clock.now += 0.3  # b is late past its tolerance (handed to another worker, say)
    assert limiter.wait("t", limit, ("e", 1)) == 0  # takes b's slot
    assert limiter.wait("t", limit, ("b", 1)) == pytest.approx(1.6)  # b queues anew
    clock.now += 60  # slots never claimed are forgotten, not hoarded for a burst
    assert limiter.wait("t", limit, ("f", 1)) == 0
    assert limiter.wait("t", limit, ("g", 1)) == pytest.approx(1.0)


def test_a_short_wait_is_waited_in_place() -> None:
    clock = Clock()
    limiter = RateLimiter(clock, park=0.02)
    limit = RateLimit(100, 1, "100/s")
    assert limiter.wait("t", limit, ("a", 1)) == 0
    assert limiter.wait("t", limit, ("b", 1)) == pytest.approx(0.01)  # taken: waits here
    assert limiter.wait("t", limit, ("c", 1)) == pytest.approx(0.02)
    assert limiter.wait("t", limit, ("d", 1)) == pytest.approx(0.03)  # handed back


class Recorded(Delivery):
    body = b""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def ack(self) -> None: ...
    async def requeue(self) -> None: ...
    async def dead_letter(self, reason: str) -> None: ...

    async def retry_later(self, delay: float) -> None:
        self.delays.append(delay)


async def test_pace_hands_back_until_the_slot() -> None:
    limiter = RateLimiter(Clock(), park=0.0)
    limit = RateLimit(1, 60, "1/m")
    first, second = Recorded(), Recorded()
    assert not await limiter.pace(first, "t", limit, ("a", 1))
    assert await limiter.pace(second, "t", limit, ("b", 1))
    assert second.delays == [pytest.approx(60.0)] and first.delays == []
    assert not await limiter.pace(second, "t", None, ("b", 1))  # unlimited: never waits


def _worker_app(concurrency: int) -> QueueTasks:
    return QueueTasks(concurrency=concurrency)


async def test_100_per_second_over_n_tasks_takes_about_n_over_100_seconds() -> None:
    app = _worker_app(concurrency=8)

    @app.task(rate_limit="100/s")
    async def stamp(i: int) -> float:
        return time.time()

    n = 80
    async with app:
        tasks = [await stamp.add_task(i) for i in range(n)]
        async with asyncio.timeout(30):
            done = [await task.wait(30) for task in tasks]
        assert app._embedded is not None
        handed_back = app._embedded.limiter.handed_back
    starts = sorted(task.returning for task in done)
    span = starts[-1] - starts[0]
    # The slots are 10 ms apart: the first and the last (n - 1) slots apart, later only
    # when the machine is slow (a start never comes before its slot).
    assert (n - 1) / 100 * 0.95 <= span <= (n - 1) / 100 * 1.5 + 0.3, span
    assert handed_back >= n // 2  # most waited back in the broker, not in a slot


async def test_an_unlimited_task_is_not_held_up_behind_limited_ones() -> None:
    app = _worker_app(concurrency=2)

    @app.task(rate_limit="20/s")
    async def limited(i: int) -> float:
        return time.time()

    @app.task
    async def free() -> float:
        return time.time()

    async with app:
        waiting = [await limited.add_task(i) for i in range(30)]  # 1.5 s of slots
        sent = time.time()
        quick = await free.add_task(timeout=10)
        async with asyncio.timeout(30):
            done = [await task.wait(30) for task in waiting]
    last_limited = max(task.returning for task in done)
    assert quick.returning - sent < 0.5  # it did not wait for the limited ones' slots
    assert quick.returning < last_limited - 0.5  # it ran while limited ones waited
