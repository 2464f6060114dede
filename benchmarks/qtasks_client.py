"""The producer side of the QTasks measurements, through the public API only.

Each function runs in its own process (``benchmarks.agent``), against the backends named by
``QTASKS_BROKER_URL`` / ``QTASKS_RESULTS_URL``, with ``benchmarks.bench_app``'s tasks.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from typing import Any

from benchmarks.common import CpuMeter, emit_ready, lag_summary, loop_name, rss_mb, windowed
from qtasks import Task


def _app() -> Any:
    from benchmarks import bench_app

    return bench_app


async def enqueue(n: int, window: int, timeout: float) -> dict[str, Any]:
    """``n`` ``add_task`` calls, ``window`` in flight, nobody consuming: the enqueue rate
    and the producer's RSS with ``n`` tasks outstanding (their handles kept)."""
    bench = _app()
    app = bench.app
    deadline = time.monotonic() + timeout
    try:
        await app.start()
        gc.collect()
        rss_before = rss_mb()
        handles: list[Task | None] = [None] * n

        async def op(i: int) -> None:
            handles[i] = await bench.noop.add_task()

        t0 = time.time()
        await windowed(n, window, op, deadline)
        t1 = time.time()
        gc.collect()
        rss_after = rss_mb()
    finally:
        await app.close()
    return {"rate": n / (t1 - t0), "rss_before": rss_before, "rss_outstanding": rss_after,
            "loop": loop_name()}


async def _round_trips(bench: Any, n: int, window: int, deadline: float,
                       bounded: bool = False) -> tuple[float, float, float]:
    """``n`` tasks: ``add_task`` with ``window`` in flight, each followed by ``wait()``
    outside the window (``bounded``: inside it, so that at most ``window`` tasks are
    outstanding). Returns (first enqueue, last enqueue returned, last result)."""
    waits: list[asyncio.Task[Task]] = []
    last_enqueued = 0.0

    async def op(_: int) -> None:
        nonlocal last_enqueued
        task = await bench.noop.add_task()
        last_enqueued = time.time()
        if bounded:
            await task.wait()
            if task.status.value != "success":
                raise RuntimeError(f"task did not succeed: {task!r}")
        else:
            waits.append(asyncio.create_task(task.wait()))

    t0 = time.time()
    await windowed(n, window, op, deadline)
    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
        done = await asyncio.gather(*waits)
    t1 = time.time()
    failed = [t for t in done if t.status.value != "success"]
    if failed:
        raise RuntimeError(f"{len(failed)} tasks did not succeed, e.g. {failed[0]!r}")
    return t0, last_enqueued, t1


async def end_to_end(n: int, window: int, warmup: int, timeout: float,
                     cpu: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Tasks/s from the first ``add_task`` until the producer holds all ``n`` final
    results, after ``warmup`` tasks the same way; and the CPU seconds this producer and
    the processes of ``cpu`` (role -> pids: workers, broker) used over those ``n``."""
    bench = _app()
    app = bench.app
    deadline = time.monotonic() + timeout
    meter = CpuMeter({"producer": [os.getpid()], **(cpu or {})})
    try:
        if warmup:
            await _round_trips(bench, warmup, window, deadline)
        meter.start()
        t0, enqueued, t1 = await _round_trips(bench, n, window, deadline)
        used = meter.stop()
    finally:
        await app.close()
    return {"rate": n / (t1 - t0), "enqueue_rate": n / (enqueued - t0),
            "cpu": used, "loop": loop_name()}


async def worker_memory(phases: list[int], window: int, pids: list[int],
                        timeout: float) -> dict[str, Any]:
    """Run tasks end to end, at most ``window`` outstanding (a steady load, not a backlog),
    and read the worker processes' RSS (psutil) once the cumulative count reaches each of
    ``phases``; ``pids`` empty: this process (memory:// runs its worker embedded)."""
    bench = _app()
    app = bench.app
    deadline = time.monotonic() + timeout
    targets = pids or [os.getpid()]
    rss: dict[str, list[float]] = {}
    done = 0
    try:
        await _round_trips(bench, 100, window, deadline, True)  # connections, imports
        rss["0"] = [rss_mb(pid) for pid in targets]
        for phase in phases:
            await _round_trips(bench, phase - done, window, deadline, True)
            done = phase
            await asyncio.sleep(0.5)  # let the last acks settle
            if not pids:
                gc.collect()
            rss[str(phase)] = [rss_mb(pid) for pid in targets]
    finally:
        await app.close()
    return {"rss": rss, "loop": loop_name()}


async def stream(n: int, timeout: float, latency: bool, rate: float) -> dict[str, Any]:
    """One generator task yielding ``n`` time stamps, followed with ``task.stream()``:
    partials/s (first to last receipt) and yield-to-receipt lags, in a burst (``burst``:
    no await between yields) or paced at ``rate``/s (``latency``: ``stamps``)."""
    bench = _app()
    app = bench.app
    stamps: list[float] = []
    lags: list[float] = []
    try:
        await app.start()
        emit_ready()
        async with asyncio.timeout(timeout):
            if latency:
                task = await bench.stamps.add_task(n, rate)
            else:
                task = await bench.burst.add_task(n)
            t_enqueued = time.time()
            async for value in task.stream():
                now = time.time()
                stamps.append(now)
                lags.append(now - value if latency else bench.ticks_lag(now, value))
            await task.wait()
            t_final = time.time()
    finally:
        await app.close()
    if task.status.value != "success":
        raise RuntimeError(f"stream task ended {task.status.value}: {task.error}")
    result: dict[str, Any] = {"received": len(stamps), "loop": loop_name(),
                              "total_s": t_final - t_enqueued}
    if len(stamps) > 1:
        result["rate"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    if lags:
        result["lags"] = lag_summary(lags)
    return result
