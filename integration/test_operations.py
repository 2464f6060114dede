"""Running QTasks as a team would, on both real brokers: CLI worker processes and signals,
the operator commands, the blocking API and signed tasks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from integration.conftest import NATS_URL, RABBITMQ_URL, require_server
from integration.processes import ROOT, WorkerProcess, workers
from qtasks import QueueTasks, TaskMessage, TaskStatus

DEADLINE = 60.0


@dataclass
class Deployment:
    name: str
    url: str  # broker and results, with this test's prefix
    test_dir: Path

    @property
    def env(self) -> dict[str, str]:
        return {"QTASKS_BROKER_URL": self.url, "QTASKS_RESULTS_URL": self.url,
                "QTASKS_TEST_DIR": str(self.test_dir), "QTASKS_LOG_LEVEL": "INFO"}

    def app(self, **options: object) -> QueueTasks:
        return QueueTasks(broker=self.url, results=self.url, embedded_worker=False,
                          **options)  # type: ignore[arg-type]

    def qtasks(self, *args: str, env: dict[str, str] | None = None,
               timeout: float = DEADLINE) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "qtasks", *args], cwd=ROOT,
                              env={**os.environ, **self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(params=["rabbitmq", "nats"])
def deployment(request: pytest.FixtureRequest, prefix: str,
               tmp_path: Path) -> Iterator[Deployment]:
    if request.param == "rabbitmq":
        require_server("RabbitMQ", 5672)
        from integration.rabbitmq_support import delete_namespace_sync as cleanup
        url = f"{RABBITMQ_URL}?prefix={prefix}"
        base = RABBITMQ_URL
    else:
        require_server("NATS", 4222)
        from integration.nats_support import delete_namespace_sync as cleanup
        url = f"{NATS_URL}?prefix={prefix}"
        base = NATS_URL
    try:
        yield Deployment(request.param, url, tmp_path)
    finally:
        cleanup(base, prefix)


def wait_for(predicate: object, timeout: float = DEADLINE, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_blocking_api_from_threads(deployment: Deployment) -> None:
    app = deployment.app()
    client = app.sync
    try:
        with workers(deployment.env, count=1):
            events = client.listen("countdown")
            results: list[object] = []

            def produce() -> None:
                results.append(client.add_task("countdown", 3, timeout=DEADLINE).returning)

            threads = [threading.Thread(target=produce) for _ in range(6)]
            for thread in threads:
                thread.start()
            streamed = client.add_task("countdown", 4, 0.01)
            assert list(streamed.stream()) == [3, 2, 1, 0]
            for thread in threads:
                thread.join(DEADLINE)
            finals = 0
            for event in events:
                finals += event.kind == "final"
                if finals == 7:
                    break
            assert results == [[2, 1, 0]] * 6
            found = client.get(streamed.id)
            assert found is not None and found.status is TaskStatus.SUCCESS
    finally:
        client.close()


def test_cli_send_streams_as_it_goes_then_status(deployment: Deployment) -> None:
    with workers(deployment.env, count=1):
        proc = subprocess.Popen(
            [sys.executable, "-m", "qtasks", "send", "countdown", "--args", "[4, 0.3]",
             "--stream", "--timeout", "60"], cwd=ROOT, env={**os.environ, **deployment.env},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        arrivals = [(time.monotonic(), line.rstrip()) for line in proc.stdout]
        assert proc.wait(DEADLINE) == 0, proc.stderr.read() if proc.stderr else ""
    lines = [line for _, line in arrivals]
    task_id = lines[0].split()[-1]
    assert lines[1:] == ["[0] 3", "[1] 2", "[2] 1", "[3] 0", "success: [3,2,1,0]"]  # [seq]
    # Partials were printed while the task ran (0.3 s apart), not all at the end.
    assert arrivals[4][0] - arrivals[1][0] > 0.6
    status = deployment.qtasks("status", task_id, "--json")
    assert status.returncode == 0, status.stderr
    state = orjson.loads(status.stdout)
    assert (state["status"], state["returning"], state["partials"]) == ("success",
                                                                         [3, 2, 1, 0], 4)
    missing = deployment.qtasks("status", "0190aaaa-0000-7000-8000-000000000000")
    assert missing.returncode == 1 and "no task" in missing.stdout


def test_cli_listen_prints_live_events(deployment: Deployment) -> None:
    listener = subprocess.Popen(
        [sys.executable, "-m", "qtasks", "listen", "countdown", "--json", "--limit", "5"],
        cwd=ROOT, env={**os.environ, **deployment.env}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        assert listener.stderr is not None
        assert "listening to countdown" in listener.stderr.readline()
        with workers(deployment.env, count=1):
            sent = deployment.qtasks("send", "countdown", "--args", "[3]", "--wait", "--json")
            assert sent.returncode == 0, sent.stderr
            out, _ = listener.communicate(timeout=DEADLINE)
    finally:
        listener.kill()
    events = [orjson.loads(line) for line in out.splitlines()]
    assert [e["kind"] for e in events] == ["status", "partial", "partial", "partial", "final"]
    assert [e["value"] for e in events[1:4]] == [2, 1, 0]
    assert events[-1]["returning"] == [2, 1, 0]


def test_cli_cancel_stops_a_task_in_a_worker_process(deployment: Deployment) -> None:
    app = deployment.app()
    client = app.sync
    try:
        with workers(deployment.env, count=1):
            task = client.add_task("countdown", 1000, 0.05)
            values = task.stream()
            assert next(values) == 999  # it runs
            cancelled = deployment.qtasks("cancel", task.id, "--reason", "ops", "--wait",
                                          "--json")
            assert cancelled.returncode == 0, cancelled.stderr
            state = orjson.loads(cancelled.stdout)
            assert state["status"] == "cancelled"
            assert state["error"]["type"] == "TaskCancelled"
            assert "ops" in state["error"]["message"]
            assert 0 < state["partials"] < 1000
            after = client.add_task("add", 2, 3, timeout=DEADLINE)  # the worker goes on
            assert after.returning == 5
    finally:
        client.close()


def test_cli_inspect_and_dead_letters(deployment: Deployment) -> None:
    app = deployment.app()
    client = app.sync
    try:
        client.run(app.start())
        client.run(app.broker.declare(["default"]))
        client.run(app.broker.publish(TaskMessage(id="g1", task="add"), b"not json at all"))
        client.add_task("no_such_task", 1)
        inspect = deployment.qtasks("inspect", "--json")
        assert inspect.returncode == 0, inspect.stderr
        queues = orjson.loads(inspect.stdout)["queues"]
        assert queues[0]["queue"] == "default" and queues[0]["ready"] == 2
        with workers(deployment.env, count=1):
            assert client.add_task("add", 1, 2, timeout=DEADLINE).returning == 3
            wait_for(lambda: len(client.run(app.broker.dead_letters())) == 2,
                     what="two dead letters")
        listed = deployment.qtasks("dead", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        letters = [orjson.loads(line) for line in listed.stdout.splitlines()]
        reasons = sorted(letter["reason"].split(":")[0] for letter in letters)
        assert reasons == ["undecodable", "unknown task"]
        assert any(letter["body"] == "not json at all" for letter in letters)
        assert orjson.loads(deployment.qtasks("inspect", "--json").stdout)["dead_letters"] == 2
        requeued = deployment.qtasks("dead", "requeue")
        assert requeued.returncode == 0 and "requeued 2" in requeued.stdout
        assert len(client.run(app.broker.dead_letters())) == 0
        purged = deployment.qtasks("dead", "purge", "--yes")
        assert purged.returncode == 0, purged.stderr
    finally:
        client.close()


def test_cli_inspect_counts_workers_and_their_tasks_alike_on_every_broker(
        deployment: Deployment) -> None:
    """In flight and consumers are filled on both brokers (RabbitMQ has no unacked count
    over AMQP, NATS no consumer count for a shared pull consumer): from the workers'
    answers to a ping, or the broker's own figure where it has one."""
    app = deployment.app()
    client = app.sync
    try:
        with workers(deployment.env, count=2):
            tasks = [client.add_task("long_task", f"held{i}", 30) for i in range(3)]
            wait_for(lambda: len(list(deployment.test_dir.glob("started-held*"))) == 3,
                     what="three tasks running")
            shown = deployment.qtasks("inspect", "--json")
            assert shown.returncode == 0, shown.stderr
            report = orjson.loads(shown.stdout)
            [default] = report["queues"]
            assert default["in_flight"] == 3 and default["consumers"] == 2
            assert len(report["workers"]) == 2
            assert sum(sum(w["in_flight"].values()) for w in report["workers"]) == 3
            table = deployment.qtasks("inspect").stdout
            assert any(line.split()[:4] == ["default", "0", "3", "2"]
                       for line in table.splitlines()), table
            for task in tasks:
                client.cancel(task.id)
                task.wait(DEADLINE)
    finally:
        client.close()


def test_cli_unreachable_broker_is_a_clear_error(deployment: Deployment) -> None:
    url = ("amqp://guest:s3cret@127.0.0.1:1/" if deployment.name == "rabbitmq"
           else "nats://user:s3cret@127.0.0.1:1")
    result = deployment.qtasks("status", "x", "--broker", url, "--connect-timeout", "3",
                               timeout=30)
    assert result.returncode == 2
    assert re.match(r"qtasks: cannot (reach|connect)", result.stderr)
    assert len(result.stderr.splitlines()) == 1, result.stderr  # no client-library lines
    assert "s3cret" not in result.stderr + result.stdout


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_lets_the_running_task_finish(deployment: Deployment,
                                              stop: signal.Signals) -> None:
    """Either signal stops a worker gracefully; ``--queues`` takes tasks from each queue."""
    app = deployment.app()
    client = app.sync
    try:
        worker = WorkerProcess(deployment.env, grace=30, queues="default,reports")
        try:
            worker.wait_ready()
            report = client.add_task("report", "q2", timeout=DEADLINE)
            assert report.returning == f"report q2 by {worker.pid}"
            task = client.add_task("long_task", "graceful", 1.5)
            wait_for(lambda: any(deployment.test_dir.glob("started-graceful-*")),
                     what="the task to start")
            worker.proc.send_signal(stop)
            assert worker.proc.wait(DEADLINE) == 0, worker.output
        finally:
            worker.kill()
        assert task.wait(DEADLINE).status is TaskStatus.SUCCESS
        assert task.returning == f"graceful done by {worker.pid}"
    finally:
        client.close()


def test_sigterm_past_grace_gives_the_task_to_another_worker(deployment: Deployment) -> None:
    app = deployment.app()
    client = app.sync
    try:
        first = WorkerProcess(deployment.env, grace=0.5)
        try:
            first.wait_ready()
            task = client.add_task("long_task", "requeued", 3)
            wait_for(lambda: any(deployment.test_dir.glob(f"started-requeued-{first.pid}")),
                     what="the task to start")
            began = time.monotonic()
            first.proc.send_signal(signal.SIGTERM)
            assert first.proc.wait(DEADLINE) == 0, first.output
            assert time.monotonic() - began < 10
        finally:
            first.kill()
        with workers(deployment.env, count=1) as (second,):
            assert task.wait(DEADLINE).returning == f"requeued done by {second.pid}"
    finally:
        client.close()


def test_only_signed_tasks_run_across_processes(deployment: Deployment) -> None:
    signed_env = {**deployment.env, "QTASKS_SIGNING_KEY": "shared secret"}
    producer = deployment.app(signing_key="shared secret")
    forger = deployment.app(signing_key="guessed")
    client, forged_client = producer.sync, forger.sync
    try:
        with workers(signed_env, count=1):
            forged = forged_client.add_task("long_task", "forged", 0)
            assert client.add_task("add", 2, 3, timeout=DEADLINE).returning == 5
            wait_for(lambda: len(client.run(producer.broker.dead_letters())) == 1,
                     what="the forged task to be dead-lettered")
        letter = client.run(producer.broker.dead_letters())[0]
        assert letter.reason.startswith("forged message")
        assert client.get(forged.id) is None
        assert not any(deployment.test_dir.glob("started-forged-*"))
    finally:
        forged_client.close()
        client.close()
