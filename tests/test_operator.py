"""The operator commands, in-process on memory (their real-broker runs are in integration/)."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator

import orjson
import pytest

from qtasks import QueueTasks, TaskMessage
from qtasks.operator import Operator
from tests.contract import DEADLINE, gate, register_contract_tasks, running_worker, settled


@pytest.fixture
async def setup() -> AsyncIterator[tuple[str, QueueTasks, io.StringIO]]:
    url = f"memory://{uuid.uuid4().hex}"
    worker_app = QueueTasks(url, embedded_worker=False)
    register_contract_tasks(worker_app)
    yield url, worker_app, io.StringIO()
    await worker_app.close()


async def test_send_stream_then_status(setup: tuple[str, QueueTasks, io.StringIO]) -> None:
    url, worker_app, out = setup
    async with running_worker(worker_app), Operator(url, None, out=out) as op:
        code = await op.send("count", [3], {}, queue=None, priority=None, delay=None,
                             wait=True, stream=True, timeout=DEADLINE, as_json=False)
        lines = out.getvalue().splitlines()
        task_id = lines[0].split()[-1]
        assert code == 0
        assert lines[1:] == ["[0] 0", "[1] 1", "[2] 2", "success: [0,1,2]"]  # [seq] value
        out.truncate(0)
        out.seek(0)
        assert await op.status(task_id, as_json=True) == 0
        state = orjson.loads(out.getvalue())
        assert (state["status"], state["returning"], state["partials"],
                state["last_partial"]) == ("success", [0, 1, 2], 3, 2)
        assert await op.status(str(uuid.uuid4()), as_json=False) == 1


async def test_failed_task_exits_non_zero(setup: tuple[str, QueueTasks, io.StringIO]) -> None:
    url, worker_app, out = setup
    async with running_worker(worker_app), Operator(url, None, out=out) as op:
        code = await op.send("fail_mid_gen", [], {}, queue=None, priority=None, delay=None,
                             wait=True, stream=False, timeout=DEADLINE, as_json=True)
    assert code == 1
    final = orjson.loads(out.getvalue().splitlines()[-1])
    assert final["error"]["type"] == "ValueError"


async def test_inspect_and_dead_letters(setup: tuple[str, QueueTasks, io.StringIO]) -> None:
    url, worker_app, out = setup
    async with Operator(url, None, out=out) as op:
        await op.app.add_task("add", 1, 2)
        await op.app.broker.publish(TaskMessage(id="x", task="add"), b"garbage")
        await op.inspect(["default"], as_json=True)
        assert orjson.loads(out.getvalue()) == {
            "queues": [{"queue": "default", "ready": 2, "in_flight": 0, "consumers": 0}],
            "dead_letters": 0, "workers": []}
        async with running_worker(worker_app) as worker:
            await settled(worker, 2)
            out.truncate(0)
            out.seek(0)
            await op.inspect(["default"], as_json=True)
            seen = orjson.loads(out.getvalue())
            assert seen["queues"][0]["consumers"] == 1
            assert [w["id"] for w in seen["workers"]] == [worker.name]
        out.truncate(0)
        out.seek(0)
        await op.dead("list", [], 10, as_json=True)
        letter = orjson.loads(out.getvalue())
        assert letter["body"] == "garbage" and letter["reason"].startswith("undecodable")
        out.truncate(0)
        out.seek(0)

        async def no_fetching(limit: int = 100) -> list[object]:
            raise AssertionError("inspect counts dead letters without fetching them")

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(op.app.broker, "dead_letters", no_fetching)
            await op.inspect(["default"], as_json=True)
        assert orjson.loads(out.getvalue())["dead_letters"] == 1
        assert await op.dead("requeue", [letter["ref"]], 10, as_json=False) == 0
        assert len(await op.app.broker.dead_letters()) == 0
        assert (await op.app.broker.inspect(["default"]))[0].ready == 1
        async with running_worker(worker_app) as worker:
            await settled(worker, 1)
        assert await op.dead("purge", [], 10, as_json=False, yes=True) == 0
        assert out.getvalue().splitlines()[-1] == "purged 1"


async def test_cancel_a_running_task_and_wait(setup: tuple[str, QueueTasks, io.StringIO]) -> None:
    url, worker_app, out = setup
    token = uuid.uuid4().hex
    async with running_worker(worker_app), Operator(url, None, out=out) as op:
        task = await op.app.add_task("held", token)
        await asyncio.wait_for(gate(f"{token}:started").wait(), DEADLINE)
        code = await op.cancel(task.id, "from a shell", wait=True, timeout=DEADLINE,
                               as_json=True)
    state = orjson.loads(out.getvalue().splitlines()[-1])
    assert code == 0
    assert state["status"] == "cancelled" and "from a shell" in state["error"]["message"]


async def test_status_of_a_running_generator_shows_its_progress(
        setup: tuple[str, QueueTasks, io.StringIO]) -> None:
    """``get`` holds the latest status only; ``status`` reads the partials so far."""
    url, worker_app, out = setup
    token = uuid.uuid4().hex

    @worker_app.task(name="gated_gen")
    async def gated_gen(token: str):  # type: ignore[no-untyped-def]
        for value in ("a", {"b": 1}, [3]):
            yield value
        await gate(token).wait()
        yield "last"

    async with running_worker(worker_app), Operator(url, None, out=out) as op:
        task = await op.app.send_task("gated_gen", [token])
        seen, running = 0, False
        async with asyncio.timeout(DEADLINE):  # three partials and the running status
            async for event in op.app.task_handle(task.id).events():
                seen += event.kind == "partial"
                running = running or event.status == "running"
                if seen == 3 and running:
                    break
        assert await op.status(task.id, as_json=True, idle=0.2) == 0
        running = orjson.loads(out.getvalue())
        assert (running["status"], running["partials"], running["last_partial"]) == (
            "running", 3, [3])
        out.truncate(0)
        out.seek(0)
        assert await op.status(task.id, as_json=False, idle=0.2) == 0
        text = out.getvalue()
        assert "    partials: 3" in text and "last_partial: [3]" in text
        assert "   returning: null" in text  # values are JSON, as send and listen print
        gate(token).set()
        await task.wait(DEADLINE)
        out.truncate(0)
        out.seek(0)
        assert await op.status(task.id, as_json=True, idle=0.2) == 0
        done = orjson.loads(out.getvalue())
        assert (done["status"], done["partials"], done["last_partial"]) == ("success", 4,
                                                                            "last")


async def test_send_keeps_the_tasks_arguments_apart_from_options(
        setup: tuple[str, QueueTasks, io.StringIO]) -> None:
    """``--kwargs '{"task_id": ..., "delay": ..., "timeout": ...}'`` are the task's own."""
    url, worker_app, out = setup

    @worker_app.task(name="echo")
    async def echo(task_id: str, delay: float, timeout: int) -> list[object]:
        return [task_id, delay, timeout]

    async with running_worker(worker_app), Operator(url, None, out=out) as op:
        code = await op.send("echo", [], {"task_id": "x", "delay": 0.2, "timeout": 1},
                             queue=None, priority=None, delay=None, wait=True, stream=False,
                             timeout=DEADLINE, as_json=True)
    first, final = (orjson.loads(line) for line in out.getvalue().splitlines())
    assert code == 0 and first["id"] != "x"
    assert final["returning"] == ["x", 0.2, 1]


async def test_stream_json_lines_are_partial_events_numbered_by_seq(
        setup: tuple[str, QueueTasks, io.StringIO]) -> None:
    url, worker_app, out = setup
    async with running_worker(worker_app), Operator(url, None, out=out) as op:
        await op.send("count", [2], {}, queue=None, priority=None, delay=None, wait=False,
                      stream=True, timeout=DEADLINE, as_json=True)
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["kind"], e["seq"], e["value"]) for e in lines[1:3]] == [
        ("partial", 0, 0), ("partial", 1, 1)]
    assert lines[-1]["status"] == "success"


async def test_dead_requeue_of_an_unknown_ref_names_it(
        setup: tuple[str, QueueTasks, io.StringIO], capsys: pytest.CaptureFixture[str]) -> None:
    url, _, out = setup
    async with Operator(url, None, out=out) as op:
        assert await op.dead("requeue", ["0123456789abcdef"], 10, as_json=True) == 1
    assert orjson.loads(out.getvalue()) == {"requeued": []}
    assert "no dead letter 0123456789abcdef" in capsys.readouterr().err


async def test_dead_purge_asks_first(setup: tuple[str, QueueTasks, io.StringIO]) -> None:
    url, _, out = setup
    questions: list[str] = []

    def answer(question: str) -> bool:
        questions.append(question)
        return len(questions) > 1  # no, then yes

    async with Operator(url, None, out=out, confirm=answer) as op:
        await op.app.broker.publish(TaskMessage(id="x", task="add"), b"garbage")
        worker_app = QueueTasks(url, embedded_worker=False)
        async with running_worker(worker_app) as worker:
            await settled(worker, 1)
        await worker_app.close()
        assert await op.dead("purge", [], 10, as_json=False) == 1
        assert await op.app.broker.dead_count() == 1
        assert await op.dead("purge", [], 10, as_json=True) == 0
    assert questions == ["purge 1 dead letter(s) for good?"] * 2
    assert orjson.loads(out.getvalue()) == {"purged": 1}
