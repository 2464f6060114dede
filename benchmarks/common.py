"""Small helpers shared by the harness's processes: statistics, event loop, RSS, output."""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import orjson

from qtasks.cli import run as cli_run

T = TypeVar("T")

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("BENCH_NATS_URL", "nats://127.0.0.1:4222")

#: Line prefixes of the protocol between the orchestrator and its child processes.
READY = "BENCH-READY"
RESULT = "BENCH-RESULT "


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """The loop the QTasks CLI worker picks (uvloop unless ``QTASKS_UVLOOP=0``), so that
    raw and QTasks figures run on one kind of loop."""
    return cli_run(main)


def loop_name() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def rss_mb(pid: int | None = None) -> float:
    import psutil  # type: ignore[import-untyped]

    return float(psutil.Process(pid or os.getpid()).memory_info().rss) / 1e6


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds the processes ``pids`` have used so far (0 for one that
    is gone), their children not included."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


class CpuMeter:
    """CPU seconds per role (``worker``, ``producer``, ``broker`` …) over one measured
    window: a figure that moves far less than a rate when a neighbour is noisy, since
    time spent waiting for the CPU is not counted."""

    def __init__(self, roles: dict[str, Sequence[int]]) -> None:
        self.roles = {role: list(pids) for role, pids in roles.items() if pids}
        self.started: dict[str, float] = {}

    def start(self) -> None:
        self.started = {role: cpu_seconds(pids) for role, pids in self.roles.items()}

    def stop(self) -> dict[str, float]:
        return {role: cpu_seconds(pids) - self.started[role]
                for role, pids in self.roles.items()}


def listening_pids(port: int) -> list[int]:
    """The processes listening on TCP ``port`` on this machine (the broker), found once
    per step by the orchestrator; empty when psutil may not see them."""
    import psutil

    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return []
    return sorted({c.pid for c in connections
                   if c.pid and c.status == psutil.CONN_LISTEN and c.laddr.port == port})


def emit_result(data: dict[str, Any]) -> None:
    """The one line the orchestrator reads from a child process."""
    sys.stdout.write(RESULT + orjson.dumps(data).decode() + "\n")
    sys.stdout.flush()


def emit_ready() -> None:
    sys.stdout.write(READY + "\n")
    sys.stdout.flush()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def lag_summary(lags: Sequence[float]) -> dict[str, float]:
    """Yield-to-receipt lags (seconds, in receipt order) as the figures the table shows,
    in milliseconds: computed in the child, so that its result line stays short."""
    ms = [lag * 1000 for lag in lags]
    return {"first": ms[0], "p50": percentile(ms, 50), "p99": percentile(ms, 99),
            "max": max(ms)}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


async def windowed(count: int, window: int, op: Callable[[int], Awaitable[None]],
                   deadline: float) -> None:
    """Run ``op(0) .. op(count-1)`` with at most ``window`` in flight, by ``window``
    coroutines taking the next index; raise TimeoutError past ``deadline`` (monotonic)."""
    next_index = 0

    async def lane() -> None:
        nonlocal next_index
        while next_index < count:
            i = next_index
            next_index += 1
            await op(i)

    lanes = [asyncio.create_task(lane()) for _ in range(min(window, count))]
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            await asyncio.gather(*lanes)
    finally:
        for lane_task in lanes:
            lane_task.cancel()


async def timed_windowed(count: int, window: int, op: Callable[[int], Awaitable[None]],
                         deadline: float, cpu: dict[str, list[int]] | None = None,
                         ) -> dict[str, Any]:
    """``windowed``, timed: the result a raw client reports (wall clock, so that a peer
    process's timestamps compare with it), with the CPU seconds this process (the
    ``publisher``) and those of ``cpu`` used meanwhile."""
    meter = CpuMeter({"publisher": [os.getpid()], **(cpu or {})})
    meter.start()
    t0 = time.time()
    await windowed(count, window, op, deadline)
    t1 = time.time()
    return {"t0": t0, "t1": t1, "rate": count / (t1 - t0), "cpu": meter.stop(),
            "loop": loop_name()}


class Replies:
    """Requests waiting for their reply, by key: ``expect`` before sending, ``resolve``
    when the reply comes."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[None]] = {}

    def expect(self, key: str) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        self._waiting[key] = future
        return future

    def resolve(self, key: str) -> None:
        future = self._waiting.pop(key, None)
        if future is not None and not future.done():
            future.set_result(None)
