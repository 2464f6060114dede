"""The operator commands, in-process on memory (their real-broker runs are in integration/)."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
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
        assert lines[1:] == ["[1] 0", "[2] 1", "[3] 2", "success: [0,1,2]"]
        out.truncate(0)
        out.seek(0)
        assert await op.status(task_id, as_json=True) == 0
        state = orjson.loads(out.getvalue())
        assert (state["status"], state["returning"], state["partials"]) == ("success",
                                                                             [0, 1, 2], 3)
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
        assert orjson.loads(out.getvalue())["queues"] == [
            {"queue": "default", "ready": 2, "in_flight": 0, "consumers": None}]
        async with running_worker(worker_app) as worker:
            await settled(worker, 2)
        out.truncate(0)
        out.seek(0)
        await op.dead("list", [], 10, as_json=True)
        letter = orjson.loads(out.getvalue())
        assert letter["body"] == "garbage" and letter["reason"].startswith("undecodable")
        await op.dead("requeue", [letter["ref"]], 10, as_json=False)
        assert len(await op.app.broker.dead_letters()) == 0
        assert (await op.app.broker.inspect(["default"]))[0].ready == 1
        async with running_worker(worker_app) as worker:
            await settled(worker, 1)
        await op.dead("purge", [], 10, as_json=False)
        assert out.getvalue().splitlines()[-1] == "purged 1"


def test_cli_explains_bad_input() -> None:
    def qtasks(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "qtasks", *args], capture_output=True,
                              text=True, timeout=60, env={"PATH": ""})

    no_broker = qtasks("send", "add")
    assert no_broker.returncode == 2 and "no broker" in no_broker.stderr
    bad_scheme = qtasks("status", "x", "--broker", "redis://user:secret@h/")
    assert bad_scheme.returncode == 2 and "no broker for scheme 'redis'" in bad_scheme.stderr
    bad_json = qtasks("send", "add", "--broker", "memory://", "--args", "{")
    assert bad_json.returncode == 2 and "--args" in bad_json.stderr
    for command in ("send", "listen", "status", "cancel", "inspect", "dead", "worker", "demo"):
        assert qtasks(command, "--help").returncode == 0


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
