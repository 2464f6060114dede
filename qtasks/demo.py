"""``qtasks demo``: the seed's generator task on the embedded default, streamed live."""

from __future__ import annotations

import asyncio
import time

from qtasks.app import QueueTasks


def build_app(url: str | None = None, delay: float = 0.2) -> QueueTasks:
    app = QueueTasks(url)

    async def yield_func(result: int) -> int:
        return result + 2

    @app.task(name="test_yield", description="Test task with a generator.",
              generate_handler=yield_func)
    async def test_yield(n: int):  # type: ignore[no-untyped-def]
        for _ in range(n):
            n += 1
            await asyncio.sleep(delay)  # some work between yields, to watch them arrive
            yield n

    return app


async def run_demo(url: str | None = None, n: int = 5, delay: float = 0.2) -> list[int]:
    app = build_app(url, delay)
    async with app:
        begin = time.perf_counter()
        task = await app.add_task("test_yield", n)
        print(f"enqueued test_yield({n}) as {task.id}")
        async for part in task.stream():
            print(f"  partial after {time.perf_counter() - begin:5.2f} s: {part}")
        await task.wait(timeout=30)
        print(f"{task.status.value}: returning = {task.returning}")
        return list(task.returning)
