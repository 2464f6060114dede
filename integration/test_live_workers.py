"""Live workers on both real brokers, with real CLI worker processes and real signals:
``app.workers()`` and ``qtasks workers`` list them with their counters; a worker killed
with SIGKILL drops off within three heartbeats, one stopped with SIGTERM says goodbye and
is gone at once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from integration.conftest import NATS_URL, RABBITMQ_URL, require_server
from integration.processes import ROOT, WorkerProcess
from qtasks import QueueTasks
from qtasks.interfaces import close_iterator
from qtasks.workers import WorkersChange

#: The workers' heartbeat here: short, so that the drop is measured in seconds.
BEAT = 1.0
DEADLINE = 60.0


@pytest.fixture(params=["rabbitmq", "nats"])
def broker_url(request: pytest.FixtureRequest, prefix: str) -> Iterator[str]:
    if request.param == "rabbitmq":
        require_server("RabbitMQ", 5672)
        from integration.rabbitmq_support import delete_namespace_sync as cleanup
        base = RABBITMQ_URL
    else:
        require_server("NATS", 4222)
        from integration.nats_support import delete_namespace_sync as cleanup
        base = NATS_URL
    try:
        yield f"{base}?prefix={prefix}"
    finally:
        cleanup(base, prefix)


def _env(url: str, tmp_path: Path) -> dict[str, str]:
    return {"QTASKS_BROKER_URL": url, "QTASKS_RESULTS_URL": url,
            "QTASKS_TEST_DIR": str(tmp_path), "QTASKS_HEARTBEAT": str(BEAT)}


async def _qtasks(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "qtasks", *args], cwd=ROOT,
        env={**os.environ, **env}, capture_output=True, text=True, timeout=DEADLINE)


class Changes:
    """``app.watch_workers()`` read by a task; ``next(match)`` waits for a change."""

    def __init__(self, app: QueueTasks) -> None:
        self.iterator: AsyncIterator[WorkersChange] = app.watch_workers()
        self.queue: asyncio.Queue[tuple[float, WorkersChange]] = asyncio.Queue()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        async for change in self.iterator:
            self.queue.put_nowait((loop.time(), change))

    async def next(self, match: Any, timeout: float = DEADLINE) -> tuple[float, WorkersChange]:
        async with asyncio.timeout(timeout):
            while True:
                at, change = await self.queue.get()
                if match(change):
                    return at, change

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await close_iterator(self.iterator)


async def test_workers_are_listed_lost_on_sigkill_and_gone_on_sigterm(
        broker_url: str, tmp_path: Path) -> None:
    env = _env(broker_url, tmp_path)
    app = QueueTasks(broker=broker_url, results=broker_url, embedded_worker=False)
    procs = [WorkerProcess(env, concurrency=4) for _ in range(2)]
    changes: Changes | None = None
    try:
        for proc in procs:
            await asyncio.to_thread(proc.wait_ready)
        pids = {proc.pid for proc in procs}
        listed = await app.workers()
        assert {w.pid for w in listed} == pids
        assert all(w.heartbeat == BEAT and w.concurrency == 4 and w.in_flight == 0
                   and w.state in ("online", "alive") for w in listed)
        by_pid = {w.pid: w.name for w in listed}

        shown = await _qtasks(env, "workers", "--json")
        assert shown.returncode == 0, shown.stderr
        rows = [orjson.loads(line) for line in shown.stdout.splitlines()]
        assert {r["pid"]: r["name"] for r in rows} == by_pid
        table = await _qtasks(env, "workers")
        assert table.returncode == 0 and "2 worker(s)" in table.stdout, table.stdout

        # The counters move: four successes and one failure, across both workers.
        tasks = [await app.add_task("add", i, 1) for i in range(4)]
        tasks.append(await app.add_task("add", "x", 1))  # a TypeError in the worker
        for task in tasks:
            await task.wait(DEADLINE)
        changes = Changes(app)  # pings first: both show up at once
        await changes.next(lambda c: len(c.workers) == 2)
        await changes.next(lambda c: sum(w.done for w in c.workers) == 4
                           and sum(w.failed for w in c.workers) == 1)

        watched = await _qtasks(env, "workers", "--watch", "--json", "--limit", "2")
        assert watched.returncode == 0, watched.stderr
        events = [orjson.loads(line) for line in watched.stdout.splitlines()]
        assert [e["event"] for e in events] == ["joined", "joined"]
        assert {e["worker"]["pid"] for e in events} == pids

        killed, stopped = procs
        loop = asyncio.get_running_loop()
        # SIGKILL: no goodbye; dropped after three missed heartbeats.
        await changes.next(lambda c: c.worker.pid == killed.pid and c.event == "updated")
        os.kill(killed.pid, signal.SIGKILL)
        t_kill = loop.time()
        at, lost = await changes.next(lambda c: c.event in ("lost", "left"))
        dropped_after = at - t_kill
        print(f"SIGKILL: dropped after {dropped_after:.2f} s (heartbeat {BEAT} s)")
        assert (lost.event, lost.worker.name) == ("lost", by_pid[killed.pid])
        assert [w.pid for w in lost.workers] == [stopped.pid]
        # Its last beat came at most one interval before the kill: never before two.
        assert 2 * BEAT - 0.2 <= dropped_after <= 3 * BEAT + 0.5, dropped_after

        # SIGTERM: a goodbye, well before three heartbeats.
        stopped.proc.send_signal(signal.SIGTERM)
        t_term = loop.time()
        at, left = await changes.next(lambda c: c.event in ("lost", "left"))
        gone_after = at - t_term
        print(f"SIGTERM: gone after {gone_after:.2f} s")
        assert (left.event, left.worker.name, left.workers) == (
            "left", by_pid[stopped.pid], ())
        assert gone_after < 1.5 * BEAT, gone_after  # half the time a lost one takes
        assert await asyncio.to_thread(stopped.proc.wait, DEADLINE) == 0

        assert await app.workers() == []
        after = await _qtasks(env, "workers", "--json")
        assert after.returncode == 0 and after.stdout == "", after.stdout
    finally:
        if changes is not None:
            await changes.close()
        for proc in procs:
            proc.kill()
        await app.close()
