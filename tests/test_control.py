"""The control channel's ping: every live worker describes itself, on any broker alike."""

from __future__ import annotations

import asyncio
import uuid

from qtasks import QueueTasks, Worker
from qtasks.control import ControlMessage, WorkerState, decode_control, ping_workers
from qtasks.protocol import encode


def _app(url: str, **options: object) -> QueueTasks:
    app = QueueTasks(url, embedded_worker=False, **options)  # type: ignore[arg-type]
    release = asyncio.Event()
    app.release = release  # type: ignore[attr-defined]

    @app.task(queue="slow")
    async def hold() -> str:
        await release.wait()
        return "done"

    return app


async def _ping(app: QueueTasks) -> list[WorkerState]:
    control = await app.broker.control()
    return await ping_workers(app.broker.broadcast, control, app.runtime.seal, wait=0.3)


async def test_a_ping_is_answered_by_every_worker_with_what_it_holds() -> None:
    url = f"memory://{uuid.uuid4().hex}"
    app = _app(url)
    async with app:
        workers = [Worker(app, queues=["default", "slow"], concurrency=4, name=f"w{i}")
                   for i in range(2)]
        runs = [asyncio.create_task(w.run()) for w in workers]
        for worker in workers:
            await worker.wait_started()
        task = await app.add_task("hold")
        async with asyncio.timeout(5):
            while not any(w.holding for w in workers):  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # the worker has taken the task: bounded poll
        states = await _ping(app)
        assert [s.id for s in states] == ["w0", "w1"]
        assert all(s.queues == ["default", "slow"] and s.concurrency == 4 for s in states)
        assert sorted(sum(s.in_flight.values()) for s in states) == [0, 1]
        assert {q for s in states for q in s.in_flight} == {"slow"}
        app.release.set()  # type: ignore[attr-defined]
        await task.wait(5)
        assert sum(sum(s.in_flight.values()) for s in await _ping(app)) == 0
        for worker in workers:
            worker.stop()
        await asyncio.gather(*runs)
        assert await _ping(app) == []  # stopped workers no longer answer


async def test_with_a_signing_key_an_unsigned_ping_gets_no_answer() -> None:
    url = f"memory://{uuid.uuid4().hex}"
    worker_app, stranger = _app(url, signing_key="k1"), _app(url)
    async with worker_app, stranger:
        worker = Worker(worker_app, concurrency=1, name="signed")
        run = asyncio.create_task(worker.run())
        await worker.wait_started()
        assert await _ping(stranger) == []
        assert [s.id for s in await _ping(worker_app)] == ["signed"]
        worker.stop()
        await run


def test_control_messages_round_trip() -> None:
    state = WorkerState(id="h:1:abc", queues=["a"], concurrency=3, in_flight={"a": 2},
                        processed=7, host="h", pid=1, ts=2.5)
    assert decode_control(encode(state)) == state
    ping = ControlMessage(id="p", kind="ping", ts=1.0)
    assert decode_control(encode(ping)) == ping
