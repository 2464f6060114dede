"""Child processes of the harness: CLI workers and measurement agents, with their output
logged to a file and bounded waits for readiness and results."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from benchmarks.common import READY, RESULT

ROOT = Path(__file__).resolve().parent.parent
#: Sampling at 200 Hz without pausing the process; collapsed stacks with full paths.
PYSPY_RECORD = ("record", "--format", "raw", "--rate", "200", "--nonblocking",
                "--full-filenames")


def child_env(broker_url: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The harness's environment for a child, with its backend URLs (None: memory://)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("QTASKS_BROKER_URL", "QTASKS_RESULTS_URL", "QTASKS_CONCURRENCY",
                        "QTASKS_QUEUES", "BENCH_EMBEDDED_WORKER")}
    env["PYTHONUNBUFFERED"] = "1"
    if broker_url:
        env["QTASKS_BROKER_URL"] = broker_url
        env["QTASKS_RESULTS_URL"] = broker_url
    env.update(extra or {})
    return env


class Child:
    """One child process; ``ready_marker`` is the line fragment that says it is ready."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path,
                 ready_marker: str | None = None) -> None:
        self.cmd = cmd
        self.log_path = log_path
        self.ready_marker = ready_marker
        self.lines: list[str] = []
        self.result_line: str | None = None
        self._ready = threading.Event()
        self._log = log_path.open("w")
        self._log.write("$ " + " ".join(cmd) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(RESULT):
                self.result_line = line[len(RESULT):]
                self._log.write(line[:2000] + ("...\n" if len(line) > 2000 else ""))
            else:
                self.lines.append(line)
                if len(self.lines) > 2000:
                    del self.lines[:1000]
                self._log.write(line)
            self._log.flush()
            if self.ready_marker and self.ready_marker in line:
                self._ready.set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, n: int = 15) -> str:
        return "".join(self.lines[-n:])

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.cmd[-2:]} exited before ready "
                                   f"(see {self.log_path}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready within {timeout:.0f} s (see {self.log_path})")

    def result(self, timeout: float) -> dict[str, Any]:
        """Wait (bounded) for the process to end and return its result line."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"no result within {timeout:.0f} s (see {self.log_path})") \
                from None
        self._reader.join(5)
        if self.result_line is None:
            raise RuntimeError(f"exited {self.proc.returncode} without a result "
                               f"(see {self.log_path}):\n{self.tail()}")
        data: dict[str, Any] = orjson.loads(self.result_line)
        if "error" in data:
            raise RuntimeError(f"{data['error']} (see {self.log_path})")
        return data

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._reader.join(5)
        self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def agent(fn: str, kwargs: dict[str, Any], env: dict[str, str], log_path: Path,
          profile: Path | None = None) -> Child:
    """``python -m benchmarks.agent`` running ``fn``; under ``py-spy record`` if
    ``profile`` is a path (py-spy ends with the child and writes the profile)."""
    cmd = [sys.executable, "-m", "benchmarks.agent",
           orjson.dumps({"fn": fn, "kwargs": kwargs}).decode()]
    if profile is not None:
        cmd = [pyspy(), *PYSPY_RECORD, "-o", str(profile), "--", *cmd]
    return Child(cmd, env, log_path, ready_marker=READY)


def worker(env: dict[str, str], log_path: Path, concurrency: int | None = None) -> Child:
    """A real worker process, as a user starts it."""
    cmd = [sys.executable, "-m", "qtasks", "worker", "benchmarks.bench_app:app"]
    if concurrency is not None:
        cmd += ["--concurrency", str(concurrency)]
    return Child(cmd, env, log_path, ready_marker="consuming")


def pyspy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


class Attached:
    """``py-spy record --pid`` on a running process until ``stop()``."""

    def __init__(self, pid: int, out: Path, log_path: Path) -> None:
        cmd = [pyspy(), *PYSPY_RECORD, "--pid", str(pid), "-o", str(out)]
        self.child = Child(cmd, os.environ.copy(), log_path)

    def stop(self) -> None:
        self.child.signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self.child.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.child.kill()
        self.child.stop()
