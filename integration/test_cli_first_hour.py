"""The first hour with the ``qtasks`` command on real brokers, as a new user would try it:
a worker given its broker by flag, ``--quiet``, a wrong password, and ``status`` of a
generator that is still running."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest

from integration.apps import open_gate
from integration.conftest import RABBITMQ_URL, require_server
from integration.nats_support import PrivateServer
from integration.processes import ROOT, workers
from integration.test_operations import DEADLINE, Deployment, deployment  # noqa: F401

QTASKS = [sys.executable, "-m", "qtasks"]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any QTASKS_* variable: only flags say where to go."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def run_worker_until(args: list[str], env: dict[str, str], then: object,
                     log: Path) -> str:
    """Start ``qtasks worker``, wait for its start-up line, call ``then()``, stop it with
    SIGTERM and return everything it wrote."""
    with log.open("w") as out:
        proc = subprocess.Popen([*QTASKS, "worker", *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + DEADLINE
        while "consuming" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        then()  # type: ignore[operator]
        proc.terminate()
        assert proc.wait(DEADLINE) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return log.read_text()


def test_worker_takes_broker_and_results_flags_and_quiet(deployment: Deployment,  # noqa: F811
                                                         tmp_path: Path) -> None:
    env = clean_env(QTASKS_TEST_DIR=str(deployment.test_dir))
    urls = ["--broker", deployment.url, "--results", deployment.url]
    sent: list[str] = []

    def send() -> None:
        result = subprocess.run([*QTASKS, "send", "add", "--args", "[1, 2]", "--wait",
                                 "--timeout", str(DEADLINE), *urls], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=DEADLINE)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1] == "success: 3"
        sent.append(result.stdout.split()[2])

    quiet = run_worker_until(["integration.apps:app", *urls, "--quiet"], env, send,
                             tmp_path / "quiet.log")
    start = next(line for line in quiet.splitlines() if "consuming" in line)
    shown = urlsplit(deployment.url)
    if shown.password:  # the start-up line names the URLs, passwords hidden
        assert f":{shown.password}@" not in quiet
        host = shown.netloc.replace(f":{shown.password}@", ":***@")
        shown = shown._replace(netloc=host)
    assert urlunsplit(shown) in start
    assert "with concurrency 100" in start and "add, countdown" in start
    assert sent[0] not in quiet  # --quiet: no line per finished task
    loud = run_worker_until(["integration.apps:app", *urls], env, send, tmp_path / "loud.log")
    assert any(f"add {sent[1]} success in" in line and "qtasks.worker.tasks" in line
               for line in loud.splitlines()), loud


def _refused(args: list[str]) -> str:
    result = subprocess.run([*QTASKS, *args, "--connect-timeout", "2"], cwd=ROOT,
                            env=clean_env(), capture_output=True, text=True, timeout=DEADLINE)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "wrongpass" not in result.stderr + result.stdout
    return lines[0]


def test_wrong_password_on_rabbitmq_says_authentication_failed() -> None:
    require_server("RabbitMQ", 5672)
    parts = urlsplit(RABBITMQ_URL)
    url = urlunsplit(parts._replace(
        netloc=f"{parts.username or 'guest'}:wrongpass@{parts.hostname}:{parts.port or 5672}"))
    for args in (["status", "x", "--broker", url],
                 ["worker", "integration.apps:app", "--broker", url]):
        assert _refused(args).startswith("qtasks: authentication failed: "), args


def test_wrong_password_on_nats_says_authentication_failed(tmp_path: Path) -> None:
    server = PrivateServer(str(tmp_path), 'authorization { user: alice, password: right }')
    server.start()
    try:
        url = f"nats://alice:wrongpass@127.0.0.1:{server.port}"
        for args in (["status", "x", "--broker", url],
                     ["worker", "integration.apps:app", "--broker", url]):
            assert _refused(args).startswith("qtasks: authentication failed: "), args
    finally:
        server.stop()


def test_status_of_a_running_generator_shows_partials_so_far(
        deployment: Deployment) -> None:  # noqa: F811
    def status(task_id: str) -> dict[str, object]:
        result = deployment.qtasks("status", task_id, "--json", "--idle", "1")
        assert result.returncode == 0, result.stderr
        state: dict[str, object] = orjson.loads(result.stdout)
        return state

    def until(task_id: str, wanted: str) -> dict[str, object]:
        deadline = time.monotonic() + DEADLINE
        while True:
            found = deployment.qtasks("status", task_id, "--json", "--idle", "1")
            if found.returncode == 0 and orjson.loads(found.stdout)["status"] == wanted:
                return status(task_id)
            assert time.monotonic() < deadline, found.stdout + found.stderr
            time.sleep(0.1)

    with workers(deployment.env, count=1):
        sent = deployment.qtasks("send", "gated_countdown", "--args", "[4]", "--json")
        assert sent.returncode == 0, sent.stderr
        task_id = orjson.loads(sent.stdout)["id"]
        running = until(task_id, "running")  # held at the gate after its first yield
        assert (running["partials"], running["last_partial"]) == (1, 3)
        text = deployment.qtasks("status", task_id, "--idle", "1").stdout
        assert "    partials: 1" in text and "last_partial: 3" in text
        open_gate(deployment.test_dir)
        done = until(task_id, "success")
    assert (done["partials"], done["last_partial"], done["returning"]) == (4, 0,
                                                                           [3, 2, 1, 0])


@pytest.mark.parametrize("flag", ["--stream", "--wait"])
def test_send_past_its_timeout_is_one_line(deployment: Deployment,  # noqa: F811
                                           flag: str) -> None:
    """No worker runs: the wait runs out, exit status 3, the task's id named."""
    result = deployment.qtasks("send", "countdown", "--args", "[3]", flag, "--timeout", "0.5")
    task_id = result.stdout.split()[-1]
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip() == (f"qtasks: task {task_id} did not finish within 0.5 s "
                                     "(it goes on running)")
