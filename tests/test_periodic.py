"""Periodic tasks on the memory backends: schedules computed on times the test chooses
(every=, cron= in a time zone, missed ticks, deterministic ids), declarations refused
with clear errors, and beats electing one leader that enqueues each tick once."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from qtasks import ConfigurationError, MessageEncodeError, OptionError, QueueTasks
from qtasks.beat import Beat, default_ttl
from qtasks.brokers.memory import MemoryBroker
from qtasks.periodic import SCHEDULE_HEADER, TICK_HEADER, Schedule, tick_id
from qtasks.protocol import decode_task, uuid7_time

PARIS = ZoneInfo("Europe/Paris")


def at(*parts: int, tz: Any = UTC) -> float:
    return datetime(*parts, tzinfo=tz).timestamp()  # type: ignore[misc]


# -- when a schedule fires ----------------------------------------------------------


def test_every_ticks_on_multiples_of_its_seconds() -> None:
    s = Schedule("s", "t", every=10)
    assert s.next_after(1000.0) == 1010.0
    assert s.next_after(1003.5) == 1010.0
    assert s.latest_until(1019.9) == 1010.0
    assert s.latest_until(1020.0) == 1020.0
    assert s.due(cursor=1000.0, now=1035.0, grace=60)[0] == [1010.0, 1020.0, 1030.0]
    assert s.due(cursor=1030.0, now=1035.0, grace=60)[0] == []


def test_cron_reads_the_wall_clock_of_its_time_zone() -> None:
    s = Schedule("s", "t", cron="0 9 * * *", tz=PARIS)
    summer = s.next_after(at(2024, 6, 1, 12, 0))
    assert summer == at(2024, 6, 2, 7, 0)  # 09:00 in Paris is 07:00 UTC in summer
    assert s.next_after(at(2024, 12, 1, 12, 0)) == at(2024, 12, 2, 8, 0)  # 08:00 in winter
    # Across the spring change (31 March 2024) the day has 23 hours, the ticks too.
    before = s.next_after(at(2024, 3, 30, 0, 0))  # 30 March, 09:00 in Paris
    assert s.next_after(before) - before == 23 * 3600
    utc = Schedule("u", "t", cron="0 9 * * *")  # no tz: UTC
    assert utc.next_after(at(2024, 6, 1, 12, 0)) == at(2024, 6, 2, 9, 0)
    five = Schedule("f", "t", cron="*/5 * * * *", tz=PARIS)
    assert five.due(at(2024, 6, 1, 10, 0), at(2024, 6, 1, 10, 12), grace=3600)[0] == [
        at(2024, 6, 1, 10, 5), at(2024, 6, 1, 10, 10)]
    assert five.latest_until(at(2024, 6, 1, 10, 10)) == at(2024, 6, 1, 10, 10)
    assert five.shortest_gap(at(2024, 6, 1)) == 300


def test_ticks_missed_longer_than_the_grace_are_skipped_by_default() -> None:
    s = Schedule("s", "t", every=60)
    # A beat took over 30 s late: the tick in between is still enqueued (late, once).
    assert s.due(cursor=600.0, now=690.0, grace=45)[0] == [660.0]
    # No beat for an hour: those ticks were missed; from now on it goes on.
    assert s.due(cursor=600.0, now=4210.0, grace=45)[0] == [4200.0]
    assert s.due(cursor=600.0, now=4230.0, grace=45)[0] == [4200.0]
    assert s.due(cursor=600.0, now=4250.0, grace=45)[0] == []


def test_run_once_enqueues_the_latest_missed_tick_once() -> None:
    s = Schedule("s", "t", every=60, missed="run_once")
    assert s.due(cursor=600.0, now=4250.0, grace=45)[0] == [4200.0]
    assert s.due(cursor=600.0, now=4210.0, grace=45)[0] == [4140.0, 4200.0]
    assert s.due(cursor=4200.0, now=4210.0, grace=45)[0] == []  # nothing missed: no extra
    # Three days of a one-second schedule missed: one run, computed, not counted out.
    fast = Schedule("f", "t", every=1, missed="run_once")
    started = time.perf_counter()
    assert fast.due(cursor=0.0, now=3 * 86400.0, grace=2)[0] == [
        3 * 86400.0 - 2, 3 * 86400.0 - 1, 3 * 86400.0]
    assert time.perf_counter() - started < 0.1
    cron = Schedule("c", "t", cron="0 * * * *", missed="run_once")
    assert cron.due(at(2024, 1, 1, 0, 0), at(2024, 1, 1, 5, 30), grace=60)[0] == [
        at(2024, 1, 1, 5, 0)]


def test_tick_ids_are_deterministic_uuid7s_of_the_tick_time() -> None:
    tick = at(2024, 6, 1, 10, 5)
    first = tick_id("report", tick)
    assert first == tick_id("report", tick)
    assert uuid.UUID(first).version == 7
    assert uuid7_time(first) == tick
    assert first != tick_id("report", tick + 300)
    assert first != tick_id("other", tick)
    ids = [tick_id("s", 1000.0 + i * 0.5) for i in range(100)]
    assert sorted(ids) == ids  # time-ordered, as UUIDv7s are


# -- declaring ------------------------------------------------------------------------


def test_periodic_takes_a_task_a_name_or_a_signature() -> None:
    app = QueueTasks()

    @app.task(queue="reports")
    def report(day: str) -> str:
        return day

    by_task = app.periodic(report, every=60, args=["today"])
    assert (by_task.task, by_task.args, by_task.name) == ("report", ["today"],
                                                          "report@every 60s")
    by_name = app.periodic("cleanup", cron="*/5 * * * *", tz="Europe/Paris", name="c",
                           missed="run_once")
    assert (by_name.task, by_name.cron, by_name.tz, by_name.missed) == (
        "cleanup", "*/5 * * * *", PARIS, "run_once")

    @dataclass
    class Signature:  # what task.s() gives: anything with these attributes will do
        name: str
        args: tuple[Any, ...] = ()
        kwargs: dict[str, Any] = field(default_factory=dict)
        options: dict[str, Any] = field(default_factory=dict)

    signed = app.periodic(Signature("report", ("monday",), {}, {"queue": "q2",
                                                               "priority": 3}),
                          every=5)
    assert (signed.args, signed.queue, signed.priority) == (["monday"], "q2", 3)
    with pytest.raises(ConfigurationError, match="either in the signature or"):
        app.periodic(Signature("report", ("x",)), every=5, args=["y"], name="z")
    with pytest.raises(ConfigurationError, match="cannot carry task_id"):
        app.periodic(Signature("report", options={"task_id": "x"}), every=5, name="y")
    assert set(app.schedules) == {"report@every 60s", "c", "report@every 5s"}


@pytest.mark.parametrize(("options", "error"), [
    ({}, "exactly one of cron= and every="),
    ({"cron": "* * * * *", "every": 5}, "exactly one of cron= and every="),
    ({"every": 0}, "every must be a positive number"),
    ({"every": -1}, "every must be a positive number"),
    ({"every": float("nan")}, "every must be a positive number"),
    ({"every": "5"}, "every must be a positive number"),
    ({"every": True}, "every must be a positive number"),
    ({"every": 5, "tz": "Europe/Paris"}, "tz= applies to cron="),
    ({"cron": "*/5 * * *"}, "invalid cron expression"),
    ({"cron": "61 * * * *"}, "invalid cron expression"),
    ({"cron": 5}, "cron must be a string"),
    ({"cron": "* * * * *", "tz": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
    ({"cron": "* * * * *", "tz": ""}, "tz must be a time zone name"),
    ({"every": 5, "missed": "all"}, "missed must be 'skip' or 'run_once'"),
    ({"every": 5, "name": ""}, "a schedule name must be a non-empty string"),
])
def test_bad_schedules_are_refused_at_declaration(options: dict[str, Any], error: str) -> None:
    app = QueueTasks()
    with pytest.raises(ConfigurationError, match=error):
        app.periodic("t", **options)
    assert not app.schedules


def test_bad_targets_and_arguments_are_refused() -> None:
    app = QueueTasks()
    with pytest.raises(ConfigurationError, match="takes a task name, a task or a signature"):
        app.periodic(42, every=5)
    with pytest.raises(OptionError, match="args must be a list"):
        app.periodic("t", every=5, args="abc")
    with pytest.raises(MessageEncodeError):
        app.periodic("t", every=5, args=[object()])
    app.periodic("t", every=5)
    with pytest.raises(ConfigurationError, match="already declared; give each a name="):
        app.periodic("t", every=5)


def test_import_qtasks_loads_no_cron_parser() -> None:
    code = ("import sys, qtasks; app = qtasks.QueueTasks(); app.periodic('t', every=5); "
            "import qtasks.beat; assert 'cronsim' not in sys.modules, 'cronsim loaded'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_default_lock_ttl_follows_the_most_frequent_schedule() -> None:
    now = at(2024, 6, 1)
    assert default_ttl([Schedule("a", "t", every=0.5), Schedule("b", "t", every=60)],
                       now) == 0.25
    assert default_ttl([Schedule("a", "t", every=4)], now) == 2
    assert default_ttl([Schedule("c", "t", cron="*/5 * * * *")], now) == 10  # at most


# -- beats on one memory hub ----------------------------------------------------------


def beat_app(hub: str, every: float = 0.05, **options: Any) -> QueueTasks:
    app = QueueTasks(broker=f"memory://{hub}", embedded_worker=False)
    app.periodic("tick", every=every, name="fast", **options)
    return app


async def enqueued(app: QueueTasks, count: int, timeout: float = 10) -> list[Any]:
    """The next ``count`` tick messages on the hub's default queue, taken off it."""
    hub = app.broker.hub  # type: ignore[attr-defined]
    found = []
    async with asyncio.timeout(timeout):
        while len(found) < count:
            _, entry = await hub.take(["default"])
            found.append(decode_task(entry.body))
    return found


@pytest.fixture
async def hub() -> AsyncIterator[str]:
    yield f"beats-{uuid.uuid4().hex}"


async def test_two_beats_enqueue_each_tick_once_and_the_second_takes_over(hub: str) -> None:
    every = 0.05
    apps = [beat_app(hub, every), beat_app(hub, every)]
    beats = [Beat(app, name=f"b{i}") for i, app in enumerate(apps)]
    runs = [asyncio.create_task(b.run()) for b in beats]
    reader = beat_app(hub, every)
    try:
        first = await enqueued(reader, 10)
        leader = next(i for i, b in enumerate(beats) if b.leading.is_set())
        other = 1 - leader
        assert not beats[other].leading.is_set()
        killed = time.time()
        await apps[leader].broker.close()  # as a process that dies: its lead ends
        async with asyncio.timeout(5):
            await beats[other].leading.wait()
        takeover = time.time() - killed
        second = await enqueued(reader, 10)
    finally:
        for b in beats:
            b.stop()
        await asyncio.gather(*runs)
    messages = first + second
    ticks = [float(m.headers[TICK_HEADER]) for m in messages]
    assert [m.id for m in messages] == [tick_id("fast", t) for t in ticks]
    assert all(m.headers[SCHEDULE_HEADER] == "fast" and m.task == "tick" for m in messages)
    assert len(set(ticks)) == len(ticks)  # each once
    steps = {round((b - a) / every) for a, b in itertools.pairwise(ticks)}
    assert steps == {1}, ticks  # none missing across the takeover
    assert takeover < 2 * every + 0.05


async def test_a_beat_after_an_outage_runs_the_missed_tick_once_or_skips_it(hub: str) -> None:
    hour = 3600.0
    for missed in ("run_once", "skip"):
        app = beat_app(f"{hub}-{missed}", every=hour, missed=missed)
        started = time.time()
        # What a beat recorded before every beat stopped, ten hours ago.
        recorded = (started // hour - 10) * hour
        app.broker.hub.beat_state["default"] = {"fast": recorded}  # type: ignore[attr-defined]
        beat = Beat(app, ttl=1.0, grace=1.0)
        run = asyncio.create_task(beat.run())
        try:
            async with asyncio.timeout(5):
                await beat.leading.wait()
            await asyncio.sleep(0.3)  # its first batch is at once; nothing more is due
        finally:
            beat.stop()
            await run
        ticks = []
        while app.broker.hub.depth("default"):  # type: ignore[attr-defined]
            ticks += [float(m.headers[TICK_HEADER]) for m in await enqueued(app, 1)]
        old = [t for t in ticks if t < started - 1.0]
        # run_once: the latest of the nine missed ticks, once; skip: none of them. (A
        # tick falling due in these 0.3 s, once an hour, is no missed one.)
        assert old == ([(started - 1.0) // hour * hour] if missed == "run_once" else [])
        if old:
            assert app.broker.hub.beat_state["default"]["fast"] >= old[0]  # type: ignore[attr-defined]


async def test_a_stopped_beat_hands_the_lead_over_at_once(hub: str) -> None:
    apps = [beat_app(hub, every=30), beat_app(hub, every=30)]
    first, second = Beat(apps[0]), Beat(apps[1])
    runs = [asyncio.create_task(first.run())]
    async with asyncio.timeout(5):
        await first.leading.wait()
    runs.append(asyncio.create_task(second.run()))
    await asyncio.sleep(0.1)  # given every chance to lead too, it must not
    assert not second.leading.is_set()
    first.stop()
    async with asyncio.timeout(5):
        await second.leading.wait()
    second.stop()
    await asyncio.gather(*runs)


def test_a_beat_needs_schedules_and_a_broker_that_elects() -> None:
    with pytest.raises(ConfigurationError, match="no periodic task"):
        Beat(QueueTasks())

    class NoElection(MemoryBroker):
        async def lead(self, group: str, ttl: float) -> Any:
            return await super(MemoryBroker, self).lead(group, ttl)

    app = QueueTasks(broker=NoElection())
    app.periodic("t", every=5)
    with pytest.raises(Exception, match="cannot elect a periodic scheduler"):
        asyncio.run(Beat(app).run())


def test_periodic_takes_the_signatures_of_the_canvas() -> None:
    app = QueueTasks()

    @app.task(queue="reports")
    def report(day: str, *, fmt: str = "pdf") -> str:
        return day

    schedule = app.periodic(report.s("monday", fmt="csv"), cron="0 9 * * 1",
                            tz="Europe/Paris")
    assert (schedule.task, schedule.args, schedule.kwargs) == ("report", ["monday"],
                                                               {"fmt": "csv"})
    by_name = app.periodic(app.signature("elsewhere", args=[1], queue="other"), every=60)
    assert (by_name.task, by_name.args, by_name.queue) == ("elsewhere", [1], "other")
    with pytest.raises(ConfigurationError, match="takes a task name, a task or a signature"):
        app.periodic(report.s("a") | report.s(), every=60, name="chain")


def test_the_beat_command_refuses_an_app_without_schedules_or_a_memory_broker(
        tmp_path: Any) -> None:
    (tmp_path / "noschedule.py").write_text(
        "from qtasks import QueueTasks\napp = QueueTasks('nats://127.0.0.1:1')\n")
    (tmp_path / "inmemory.py").write_text(
        "from qtasks import QueueTasks\napp = QueueTasks()\napp.periodic('t', every=5)\n")

    def beat(app: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
        return subprocess.run([sys.executable, "-m", "qtasks", "beat", app], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=60)

    refused = beat("noschedule:app")
    assert refused.returncode == 2
    assert "the app declares no periodic task" in refused.stderr
    assert "Traceback" not in refused.stderr
    refused = beat("inmemory:app")
    assert refused.returncode == 2 and "memory://" in refused.stderr
