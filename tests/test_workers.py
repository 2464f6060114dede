"""Live workers on the memory backends: announcement, heartbeats, goodbye, the drop after
three missed heartbeats, the counters, signing, and the wire format's strictness."""

from __future__ import annotations

import asyncio
import io
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from qtasks import ConfigurationError, MessageDecodeError, QueueTasks, RetryPolicy, Worker
from qtasks.cli import main
from qtasks.control import WorkerState, decode_control, ping_workers
from qtasks.interfaces import close_iterator
from qtasks.protocol import encode
from qtasks.signing import Signer
from qtasks.workers import LiveSet, WorkersChange
from qtasks.workers_command import show_workers

BEAT = 0.2
DEADLINE = 10


def _app(url: str | None = None, **options: Any) -> QueueTasks:
    app = QueueTasks(url or f"memory://{uuid.uuid4().hex}", embedded_worker=False,
                     **options)
    release = asyncio.Event()
    app.release = release  # type: ignore[attr-defined]

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def boom() -> None:
        raise ValueError("boom")

    @app.task(retry=RetryPolicy(retries=1, backoff=0.01))
    async def flaky() -> None:
        raise RuntimeError("always")

    @app.task
    async def hold() -> str:
        await release.wait()
        return "released"

    return app


class Watch:
    """``app.watch_workers()`` collected by a task, each change on a queue; ``ready()``
    returns once the watch is subscribed (a probe state it sent came back)."""

    def __init__(self, app: QueueTasks) -> None:
        self.app = app
        self.changes: asyncio.Queue[tuple[float, WorkersChange]] = asyncio.Queue()
        self.iterator: AsyncIterator[WorkersChange] = app.watch_workers()
        self.task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        async for change in self.iterator:
            self.changes.put_nowait((loop.time(), change))

    async def ready(self) -> None:
        probe = f"probe-{uuid.uuid4().hex[:6]}"
        async with asyncio.timeout(DEADLINE):
            while True:
                await self.app.broker.broadcast(encode(WorkerState(id=probe)))
                try:
                    async with asyncio.timeout(0.05):
                        while (await self.changes.get())[1].worker.name != probe:
                            pass
                        break
                except TimeoutError:
                    continue  # not subscribed yet: send it again (a bounded poll)
        await self.app.broker.broadcast(encode(WorkerState(id=probe, state="offline")))
        await self.next(lambda c: c.worker.name == probe and c.event == "left")

    async def next(self, match: Any = lambda change: True,
                   timeout: float = DEADLINE) -> tuple[float, WorkersChange]:
        """The next change that ``match``es (others are skipped), within ``timeout``."""
        async with asyncio.timeout(timeout):
            while True:
                at, change = await self.changes.get()
                if match(change):
                    return at, change

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await close_iterator(self.iterator)


async def _start(app: QueueTasks, name: str, **options: Any) -> tuple[Worker, asyncio.Task[None]]:
    worker = Worker(app, name=name, heartbeat=options.pop("heartbeat", BEAT), **options)
    run = asyncio.create_task(worker.run())
    await worker.wait_started()
    return worker, run


async def test_a_worker_announces_itself_heartbeats_and_says_goodbye() -> None:
    app = _app()
    async with app:
        watch = Watch(app)
        await watch.ready()
        worker, run = await _start(app, "w1", concurrency=3, queues=["default"])
        _, joined = await watch.next()
        assert (joined.event, joined.worker.name, joined.worker.state) == ("joined", "w1",
                                                                           "online")
        w = joined.worker
        assert (w.queues, w.concurrency, w.in_flight, w.heartbeat) == (("default",), 3, 0, BEAT)
        assert w.started_at is not None and w.started_at <= time.time()
        assert w.version  # the installed distribution's
        beats = [await watch.next() for _ in range(5)]
        # None missed three times over (the watch would have said "lost" in between) ...
        assert all(c.event == "updated" and c.worker.state == "alive" for _, c in beats)
        # ... and none faster than the interval (a late beat is not made up in a burst).
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(beats)]
        assert min(gaps) > BEAT * 0.5, gaps
        assert [x.name for x in await app.workers(wait=0.1)] == ["w1"]
        stopped = asyncio.get_running_loop().time()
        worker.stop()
        at, left = await watch.next(lambda c: c.event != "updated")
        # "left", from its goodbye: not "lost", which would take three missed beats.
        assert (left.event, left.worker.name, left.workers) == ("left", "w1", ())
        assert left.worker.state == "offline"
        assert at - stopped < 2.0  # at once; a sanity bound for a loaded machine
        await run
        assert await app.workers(wait=0.1) == []
        await watch.close()


async def test_a_silent_worker_is_dropped_after_three_of_its_own_heartbeats() -> None:
    """A worker killed without a goodbye (here: states sent by hand, then none) is lost
    after three of the intervals it announced, not after one or two."""
    app = _app()
    async with app:
        watch = Watch(app)
        await watch.ready()
        for _ in range(3):
            await app.broker.broadcast(encode(WorkerState(id="doomed", heartbeat=BEAT)))
            last_beat, _ = await watch.next(lambda c: c.worker.name == "doomed")
        # A slower worker beside it, still beating: its own interval counts for it.
        await app.broker.broadcast(encode(WorkerState(id="slow", heartbeat=BEAT * 10)))
        at, lost = await watch.next(lambda c: c.event == "lost")
        assert lost.worker.name == "doomed"
        assert [w.name for w in lost.workers] == ["slow"]
        # Never before three intervals; the upper bound is the watch's own latency,
        # generous for a loaded machine (the integration tests measure it on brokers).
        assert BEAT * 3 <= at - last_beat < BEAT * 3 + 1.5, at - last_beat
        await watch.close()


def test_the_live_set_keeps_a_worker_through_two_missed_beats_and_drops_it_at_three(
) -> None:
    app = _app()
    live = LiveSet(app.runtime)
    beat = encode(WorkerState(id="w", heartbeat=1.0))
    change = live.receive(beat, now=100.0)
    assert change is not None and change.event == "joined"
    assert live.next_deadline() == 103.0
    assert live.expire(102.9) == [] and [w.name for w in live.workers] == ["w"]
    [lost] = live.expire(103.0)
    assert (lost.event, lost.workers) == ("lost", ())
    assert live.receive(beat, now=104.0).event == "joined"  # type: ignore[union-attr]
    # A ping answer from a worker that sends no heartbeats: the default interval (2 s).
    live.receive(encode(WorkerState(id="old")), now=104.0)
    assert live.next_deadline() == 107.0
    assert live.receive(encode(WorkerState(id="nobody", state="offline")), 105.0) is None
    assert live.receive(b"{not json", 105.0) is None
    assert live.receive(orjson.dumps({"v": 1, "kind": "cancel", "id": "t"}), 105.0) is None


async def test_counters_follow_the_outcomes_of_the_tasks() -> None:
    app = _app()
    async with app:
        worker, run = await _start(app, "counting", concurrency=4)
        await app.add_task("add", 1, 2, timeout=DEADLINE)
        await app.add_task("add", 3, 4, timeout=DEADLINE)
        await app.add_task("boom", timeout=DEADLINE)
        await app.add_task("flaky", timeout=DEADLINE)  # one retry, then an error
        held = await app.add_task("hold")
        async with asyncio.timeout(DEADLINE):
            while not worker.holding:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # the worker has taken it: a bounded poll
        [w] = await app.workers(wait=0.1)
        assert (w.done, w.failed, w.retried, w.cancelled) == (2, 2, 1, 0)
        assert (w.in_flight, w.in_flight_by_queue) == (1, {"default": 1})
        await app.cancel(held.id)
        await held.wait(DEADLINE)
        [w] = await app.workers(wait=0.1)
        assert (w.done, w.failed, w.cancelled, w.in_flight) == (2, 2, 1, 0)
        assert w.uptime() is not None and 0 < w.uptime() < DEADLINE * 6  # type: ignore[operator]
        worker.stop()
        await run


async def test_a_signed_listener_ignores_unsigned_and_forged_worker_states() -> None:
    url = f"memory://{uuid.uuid4().hex}"
    signed, stranger = _app(url, signing_key="k1"), _app(url)
    async with signed, stranger:
        started = [await _start(signed, "signed"), await _start(stranger, "stranger")]
        # The stranger's worker answers the signed ping too, unsigned: ignored.
        assert [w.name for w in await signed.workers(wait=0.3)] == ["signed"]
        # An unsigned listener reads every worker (it cannot tell them apart).
        assert [w.name for w in await stranger.workers(wait=0.3)] == ["signed", "stranger"]
        for worker, run in started:
            worker.stop()
            await run
    live = LiveSet(signed.runtime)
    forged = Signer("other").sign(encode(WorkerState(id="forged")))
    assert live.receive(forged, 1.0) is None
    assert live.receive(encode(WorkerState(id="unsigned")), 1.0) is None
    assert live.receive(signed.runtime.seal(encode(WorkerState(id="ok"))), 1.0) is not None
    # Nor can a stranger make a signed listener drop a worker with a goodbye.
    assert live.receive(encode(WorkerState(id="ok", state="offline")), 1.0) is None
    assert [w.name for w in live.workers] == ["ok"]


def test_worker_states_decode_strictly_and_old_ping_answers_still_read() -> None:
    old = orjson.dumps({"v": 1, "kind": "worker", "id": "h:1:a", "queues": ["q"],
                        "concurrency": 2, "in_flight": {"q": 1}, "processed": 5,
                        "host": "h", "pid": 1, "ts": 3.0})
    state = decode_control(old)
    assert isinstance(state, WorkerState)
    assert (state.state, state.heartbeat, state.done, state.started_at, state.version) == (
        "alive", 0.0, 0, 0.0, "")
    full = WorkerState(id="x", state="stopping", heartbeat=0.5, started_at=1.0, done=3,
                       failed=1, retried=2, cancelled=4, version="1.2")
    assert decode_control(encode(full)) == full
    base = orjson.loads(encode(full))
    for field, bad in [("state", "zombie"), ("heartbeat", "2"), ("heartbeat", -1),
                       ("done", 1.5), ("failed", True), ("started_at", "now"),
                       ("version", 1)]:
        with pytest.raises(MessageDecodeError):
            decode_control(orjson.dumps({**base, field: bad}))


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), "2", True])
def test_a_bad_heartbeat_interval_is_refused(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="heartbeat"):
        Worker(_app(), heartbeat=bad)


def test_the_cli_refuses_a_bad_heartbeat(capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as usage:
        main(["worker", "x:app", "--heartbeat", "0"])
    assert usage.value.code == 2 and "more than 0 seconds" in capsys.readouterr().err
    monkeypatch.setenv("QTASKS_HEARTBEAT", "soon")
    assert main(["worker", "x:app"]) == 2
    assert "QTASKS_HEARTBEAT='soon'" in capsys.readouterr().err


async def test_the_workers_command_prints_a_table_and_json_lines() -> None:
    app = _app()
    async with app:
        worker, run = await _start(app, "w-table", concurrency=7)
        await app.add_task("add", 1, 1, timeout=DEADLINE)
        out = io.StringIO()
        assert await show_workers(app, as_json=True, wait=0.1, out=out) == 0
        [line] = out.getvalue().splitlines()
        shown = orjson.loads(line)
        assert set(shown) == {
            "name", "host", "pid", "queues", "concurrency", "in_flight",
            "in_flight_by_queue", "processed", "done", "failed", "retried", "cancelled",
            "started_at", "uptime", "last_seen", "heartbeat", "state", "version"}
        assert (shown["name"], shown["concurrency"], shown["done"]) == ("w-table", 7, 1)
        out = io.StringIO()
        await show_workers(app, as_json=False, wait=0.1, out=out)
        header, row, total = out.getvalue().splitlines()
        assert header.split()[:3] == ["worker", "host", "pid"]
        assert row.split()[0] == "w-table" and row.split()[4:6] == ["0/7", "1"]
        assert total == "1 worker(s)"
        worker.stop()
        await run


async def test_a_ping_no_longer_lists_a_worker_that_said_goodbye_meanwhile() -> None:
    app = _app()
    async with app:
        control = await app.broker.control()
        await app.broker.broadcast(encode(WorkerState(id="gone", heartbeat=BEAT)))
        await app.broker.broadcast(encode(WorkerState(id="gone", state="offline")))
        await app.broker.broadcast(encode(WorkerState(id="here", heartbeat=BEAT)))
        found = await ping_workers(app.broker.broadcast, control, app.runtime.seal, 0.1)
        assert [s.id for s in found] == ["here"]
