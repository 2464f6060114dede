"""Periodic tasks and rate limits on real RabbitMQ and NATS with real processes: three
``qtasks beat`` processes and a CLI worker, the active beat killed with SIGKILL half-way;
each tick runs exactly once, none is missing across the takeover, which comes within two
intervals. And a rate-limited task through a CLI worker."""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from integration import nats_support, rabbitmq_support
from integration.beat_app import EVERY, SCHEDULE
from integration.processes import ROOT, workers
from qtasks import QueueTasks
from qtasks.interfaces import close_iterator
from qtasks.periodic import tick_id
from qtasks.protocol import ResultEvent

DEADLINE = 60.0
APP = "integration.beat_app:app"


class BeatProcess:
    """``python -m qtasks beat integration.beat_app:app``, its lines timestamped as read."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qtasks", "beat", APP], cwd=ROOT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []
        #: When this process logged that it leads (None: never).
        self.led_at: float | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.time()
            self.lines.append((now, line))
            if " leads group " in line and self.led_at is None:
                self.led_at = now

    def enqueued(self) -> list[str]:
        """Task ids of the ticks this process says it enqueued."""
        return [line.rsplit(" enqueued as ", 1)[1].strip() for _, line in self.lines
                if " enqueued as " in line]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)


@contextmanager
def beats(env: dict[str, str], count: int) -> Iterator[list[BeatProcess]]:
    started = [BeatProcess(env) for _ in range(count)]
    try:
        yield started
    finally:
        for beat in started:
            beat.stop()


async def until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE,
                on_fail: Callable[[], str] = lambda: "") -> None:
    """Poll ``condition`` (state kept by reader threads, which have no event to await)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{on_fail()}")
        await asyncio.sleep(0.02)


@pytest.fixture(params=["rabbitmq", "nats"])
async def deployment(request: pytest.FixtureRequest, prefix: str,
                     ) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """A broker URL under a fresh prefix on each real broker, deleted afterwards."""
    if request.param == "rabbitmq":
        base = request.getfixturevalue("rabbitmq_url")
        url = rabbitmq_support.url_with(base, prefix=prefix)
    else:
        base = request.getfixturevalue("nats_url")
        url = f"{base}?prefix={prefix}"
    env = {"QTASKS_BROKER_URL": url, "QTASKS_RESULTS_URL": url, "QTASKS_LOG_LEVEL": "INFO",
           "QTASKS_TEST_EVERY": str(EVERY)}
    try:
        yield url, env
    finally:
        if request.param == "rabbitmq":
            await rabbitmq_support.delete_namespace(base, prefix)
        else:
            await nats_support.delete_namespace(base, prefix)


async def collect(app: QueueTasks, task: str, into: list[ResultEvent]) -> asyncio.Task[None]:
    """Subscribe (active on return), then append every final of ``task``."""
    events = await app.subscribe(task)

    async def run() -> None:
        try:
            async for event in events:
                if event.kind == "final":
                    into.append(event)
        finally:
            await close_iterator(events)

    return asyncio.create_task(run())


@pytest.mark.slow
async def test_three_beats_one_killed_each_tick_runs_exactly_once(
        deployment: tuple[str, dict[str, str]]) -> None:
    url, env = deployment
    reader = QueueTasks(broker=url, results=url, embedded_worker=False)
    finals: list[ResultEvent] = []
    sentinels: list[ResultEvent] = []
    collecting = [await collect(reader, "beat_tick", finals),
                  await collect(reader, "sentinel", sentinels)]
    try:
        with workers(env, count=1, concurrency=1, app=APP) as (worker,), \
                beats(env, 3) as procs:
            def logs() -> str:
                return "\n".join(f"--- beat {p.proc.pid}\n{p.output}" for p in procs) + \
                    f"\n--- worker\n{worker.output}"

            await until(lambda: any(p.led_at for p in procs), "a beat to lead", on_fail=logs)
            leader = next(p for p in procs if p.led_at)
            await until(lambda: len(finals) >= 12, "12 ticks run", on_fail=logs)
            leader.proc.kill()  # SIGKILL: no goodbye, its lock is given up by the broker
            killed_at = time.time()
            leader.proc.wait(10)
            others = [p for p in procs if p is not leader]
            await until(lambda: any(p.led_at for p in others), "another beat to lead",
                        timeout=10 * EVERY, on_fail=logs)
            takeover = min(p.led_at for p in others if p.led_at) - killed_at
            await until(lambda: len(finals) >= 30, "30 ticks run", on_fail=logs)
            for p in others:
                p.stop()  # the lead is handed over, then nobody is left: no more ticks
            logged = set(itertools.chain.from_iterable(p.enqueued() for p in procs))
            await reader.add_task("sentinel")  # behind every tick in the one queue
            await until(lambda: bool(sentinels), "the sentinel", on_fail=logs)
    finally:
        for collector in collecting:
            collector.cancel()
        await asyncio.gather(*collecting, return_exceptions=True)
        await reader.close()
    runs = collections.Counter(event.id for event in finals)
    assert all(event.status == "success" for event in finals)
    ticks = sorted(float(event.returning) for event in finals)
    assert [n for n in runs.values() if n > 1] == []  # no tick ran twice
    assert set(runs) == {tick_id(SCHEDULE, tick) for tick in ticks}
    assert logged <= set(runs)  # every tick a beat enqueued ran (the killed one may
    # have committed its last without living to log it)
    gaps = [round((b - a) / EVERY, 3) for a, b in itertools.pairwise(ticks)]
    assert set(gaps) == {1.0}, gaps  # none missing across the takeover
    assert len(ticks) >= 30
    assert 0 <= takeover <= 2 * EVERY, takeover


async def test_a_rate_limited_task_through_a_cli_worker(
        deployment: tuple[str, dict[str, str]]) -> None:
    url, env = deployment
    app = QueueTasks(broker=url, results=url, embedded_worker=False)
    n = 30
    try:
        with workers(env, count=1, concurrency=4, app=APP):
            limited = [await app.send_task("limited_stamp", [i]) for i in range(n)]
            sent = time.time()
            free = await app.send_task("free_stamp", timeout=DEADLINE)
            done = [await task.wait(DEADLINE) for task in limited]
    finally:
        await app.close()
    starts: list[Any] = sorted(task.returning for task in done)
    span = starts[-1] - starts[0]
    assert (n - 1) / 20 * 0.95 <= span <= (n - 1) / 20 * 1.5 + 1.0, span
    assert free.returning - sent < 1.0  # not behind the limited ones' slots
    assert free.returning < starts[-1] - 0.5


async def test_a_worker_with_beat_schedules_and_runs_the_ticks(
        deployment: tuple[str, dict[str, str]]) -> None:
    url, env = deployment
    reader = QueueTasks(broker=url, results=url, embedded_worker=False)
    finals: list[ResultEvent] = []
    collecting = await collect(reader, "beat_tick", finals)
    try:
        with workers(env, count=1, concurrency=2, app=APP, extra=["--beat"]) as (worker,):
            await until(lambda: len(finals) >= 4, "4 ticks run by the worker's own beat",
                        on_fail=lambda: worker.output)
            assert " leads group 'default'" in worker.output
    finally:
        collecting.cancel()
        await asyncio.gather(collecting, return_exceptions=True)
        await reader.close()
    ticks = [float(event.returning) for event in finals]
    assert [event.id for event in finals] == [tick_id(SCHEDULE, t) for t in ticks]
