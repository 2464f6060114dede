"""Real worker processes for the multi-process scenarios, started through the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """``python -m qtasks worker integration.apps:app`` with its output collected."""

    def __init__(self, env: dict[str, str], concurrency: int = 10, queues: str | None = None,
                 grace: float = 10.0, app: str = "integration.apps:app",
                 extra: Sequence[str] = ()) -> None:
        cmd = [sys.executable, "-m", "qtasks", "worker", app,
               "--concurrency", str(concurrency), "--grace", str(grace), *extra]
        if queues:
            cmd += ["--queues", queues]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if "consuming" in line:
                self._ready.set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("worker did not start:\n" + "".join(self.lines))

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    @property
    def output(self) -> str:
        return "".join(self.lines)


@contextmanager
def workers(env: dict[str, str], count: int = 1,
            **options: object) -> Iterator[list[WorkerProcess]]:
    """Start ``count`` workers, wait until each consumes, and always stop them."""
    started = [WorkerProcess(env, **options) for _ in range(count)]  # type: ignore[arg-type]
    try:
        for worker in started:
            worker.wait_ready()
        yield started
    finally:
        for worker in started:
            try:
                worker.terminate(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
