"""A real ``qtasks dashboard`` process for the integration tests, on a free port, and a
deployment (broker URL with a namespace of the test's own, deleted afterwards) on RabbitMQ
or NATS for it and its CLI workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from integration.conftest import NATS_URL, RABBITMQ_URL, require_server
from integration.processes import ROOT

TOKEN = "integration-token-0123456789abcdef"
DEADLINE = 60.0


@dataclass
class Deployment:
    name: str
    url: str
    test_dir: Path

    @property
    def env(self) -> dict[str, str]:
        return {"QTASKS_BROKER_URL": self.url, "QTASKS_RESULTS_URL": self.url,
                "QTASKS_TEST_DIR": str(self.test_dir), "QTASKS_LOG_LEVEL": "INFO"}

    def qtasks(self, *args: str, timeout: float = DEADLINE) -> subprocess.CompletedProcess[str]:
        """A ``qtasks`` command in another process (a producer that is not the page)."""
        return subprocess.run([sys.executable, "-m", "qtasks", *args], cwd=ROOT,
                              env={**os.environ, **self.env}, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def send(self, task: str, *args: object) -> str:
        """Submit ``task`` from another process; its id."""
        import orjson

        sent = self.qtasks("send", task, "--args", orjson.dumps(list(args)).decode(),
                           "--json")
        assert sent.returncode == 0, sent.stderr
        task_id: str = orjson.loads(sent.stdout.splitlines()[0])["id"]
        return task_id


def deployment_on(broker: str, prefix: str, test_dir: Path) -> Iterator[Deployment]:
    """A deployment with ``prefix`` on ``broker`` ("rabbitmq" or "nats"), its names
    deleted afterwards."""
    if broker == "rabbitmq":
        require_server("RabbitMQ", 5672)
        from integration.rabbitmq_support import delete_namespace_sync as cleanup
        base = RABBITMQ_URL
    else:
        require_server("NATS", 4222)
        from integration.nats_support import delete_namespace_sync as cleanup
        base = NATS_URL
    try:
        yield Deployment(broker, f"{base}?prefix={prefix}", test_dir)
    finally:
        cleanup(base, prefix)


class DashboardProcess:
    """``python -m qtasks dashboard integration.apps:app --port 0`` (with actions and
    ``TOKEN`` unless ``actions`` is false); ``url`` once its first line said where."""

    def __init__(self, env: dict[str, str], actions: bool = True) -> None:
        cmd = [sys.executable, "-m", "qtasks", "dashboard", "integration.apps:app",
               "--port", "0"]
        if actions:
            cmd += ["--allow-actions", "--token", TOKEN]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env,
                                                         "PYTHONUNBUFFERED": "1"},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self.url = ""
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("dashboard at http://"):
                self.url = line.split()[2].rstrip("/")
                self._ready.set()

    def wait_ready(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dashboard did not start:\n" + "".join(self.lines))
        return self.url

    def stop(self) -> int:
        """SIGTERM: the dashboard closes its connections and exits 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    @property
    def output(self) -> str:
        return "".join(self.lines)


@contextmanager
def running_dashboard(env: dict[str, str], actions: bool = True
                      ) -> Iterator[DashboardProcess]:
    """A dashboard process, ready (its subscription active); stopped with SIGTERM at the
    end of the block, and killed by its PID if it does not exit."""
    board = DashboardProcess(env, actions)
    try:
        board.wait_ready()
        yield board
    finally:
        try:
            code = board.stop()
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"the dashboard exited {code}:\n{board.output}"
