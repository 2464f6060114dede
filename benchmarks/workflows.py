"""Workflow latencies (docs/workflows.md, "Costs"): one task, a chain of 10, a chord of 20
and a fan-out of 50 with a sum, each from ``add_task()`` to the handle's result, with one
in-process worker (concurrency 50) on a namespace of its own, deleted afterwards.

    .venv/bin/python -m benchmarks.workflows memory:// amqp://guest:guest@127.0.0.1:5672/ \
        nats://127.0.0.1:4222
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from qtasks import QueueTasks, Worker, chain, chord, group


def make_app(url: str) -> QueueTasks:
    app = QueueTasks(broker=url, results=url, embedded_worker=False)

    @app.task
    async def inc(x: int = 0) -> int:
        return x + 1

    @app.task
    async def total(values: list[int]) -> int:
        return sum(values)

    @app.task
    async def numbers(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i

    return app


async def timed(run: Callable[[], Awaitable[Any]]) -> str:
    start = time.perf_counter()
    await run()
    return f"{(time.perf_counter() - start) * 1000:.0f} ms"


async def measure(base: str) -> str:
    prefix = f"wfbench{uuid.uuid4().hex[:6]}"
    url = f"memory://{prefix}" if base.startswith("memory") \
        else f"{base}{'&' if '?' in base else '?'}prefix={prefix}"
    producer, worker_app = make_app(url), make_app(url)
    worker = Worker(worker_app, concurrency=50)
    running = asyncio.create_task(worker.run())
    await worker.wait_started()
    sig = producer.signature
    try:
        one = await timed(lambda: producer.add_task("inc", 1, timeout=60))
        ten = await timed(lambda: _result(chain(sig("inc", (0,)), *[sig("inc")] * 9)))
        twenty = await timed(lambda: _result(chord(group(sig("inc", (i,)) for i in range(20)),
                                                   sig("total"))))
        fifty = await timed(lambda: _result(sig("numbers", (50,)) | sig("inc").each()
                                            | sig("total")))
    finally:
        worker.stop()
        await running
        await producer.close()
        await worker_app.close()
        await _cleanup(base, prefix)
    return (f"{base.split(':')[0]}: one task {one}; chain of 10 {ten}; chord of 20 {twenty}; "
            f"fan-out of 50 + sum {fifty}")


async def _result(workflow: Any) -> Any:
    return await (await workflow.add_task()).result(60)


async def _cleanup(base: str, prefix: str) -> None:
    if base.startswith("amqp"):
        from integration.rabbitmq_support import delete_namespace
    elif base.startswith("nats"):
        from integration.nats_support import delete_namespace
    else:
        return
    await delete_namespace(base, prefix)


if __name__ == "__main__":
    for url in sys.argv[1:] or ["memory://"]:
        print(asyncio.run(measure(url)), flush=True)
