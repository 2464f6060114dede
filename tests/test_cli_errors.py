"""The ``qtasks`` command as a new user meets it, each run as a real process: a mistake
ends in one line on stderr and an exit status, never a traceback. Nothing here needs a
server: an unreachable broker is a loopback port where nothing listens."""

from __future__ import annotations

import os
import pty
import re
import socket
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def qtasks(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    return subprocess.run([sys.executable, "-m", "qtasks", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env={**clean, **(env or {})})


def one_line(result: subprocess.CompletedProcess[str], status: int = 2) -> str:
    """The single stderr line of a refused command (no traceback, no log line before)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_version_is_the_installed_one() -> None:
    result = qtasks("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"qtasks {version('qtasks')}"


def test_every_command_has_help() -> None:
    for command in ("send", "listen", "status", "cancel", "inspect", "dead", "worker", "demo"):
        assert qtasks(command, "--help").returncode == 0


def test_usage_mistakes_name_the_flag() -> None:
    bad_level = qtasks("status", "x", "--broker", "memory://", "--log-level", "bogus")
    assert bad_level.returncode == 2 and "--log-level: unknown log level 'bogus'" \
        in bad_level.stderr
    zero = qtasks("worker", "integration.apps:app", "--concurrency", "0")
    assert zero.returncode == 2 and "--concurrency/-c: expected 1 or more" in zero.stderr
    for flag, text in (("--args", "{"), ("--kwargs", "{'a': 1}")):
        bad_json = qtasks("send", "add", "--broker", "memory://", flag, text)
        assert bad_json.returncode == 2 and f"{flag}: not valid JSON" in bad_json.stderr
        assert "_json" not in bad_json.stderr  # no internal function name
    not_array = qtasks("send", "add", "--broker", "memory://", "--args", '{"a": 1}')
    assert "--args: expected a JSON array" in not_array.stderr
    for result in (bad_level, zero, bad_json, not_array):
        assert "Traceback" not in result.stderr


def test_bad_environment_values_name_the_variable() -> None:
    line = one_line(qtasks("worker", "integration.apps:app",
                           env={"QTASKS_CONCURRENCY": "abc"}))
    assert line == "qtasks: QTASKS_CONCURRENCY='abc': expected a whole number, not 'abc'"
    line = one_line(qtasks("status", "x", "--broker", "memory://",
                           env={"QTASKS_LOG_LEVEL": "bogus"}))
    assert line.startswith("qtasks: QTASKS_LOG_LEVEL='bogus': unknown log level")
    line = one_line(qtasks("worker", "integration.apps:app", env={"QTASKS_GRACE": "-1"}))
    assert "QTASKS_GRACE='-1'" in line


def test_no_broker_and_unknown_scheme() -> None:
    assert "no broker" in one_line(qtasks("send", "add"))
    line = one_line(qtasks("status", "x", "--broker", "redis://user:secret@h/"))
    assert "no broker for scheme 'redis'" in line and "secret" not in line


def test_bad_app_paths() -> None:
    missing = one_line(qtasks("worker", "no_such_module:app"))
    assert "cannot import 'no_such_module'" in missing
    empty = one_line(qtasks("worker", ":app"))
    assert "cannot import ''" in empty
    wrong = one_line(qtasks("worker", "integration.apps:nothing"))
    assert "'integration.apps:nothing' is not a QueueTasks instance" in wrong


def test_a_worker_refuses_an_in_memory_broker() -> None:
    line = one_line(qtasks("worker", "integration.apps:app"))
    assert "memory://" in line and "no other process can reach it" in line
    assert "--broker" in line and "QTASKS_BROKER_URL" in line
    explicit = one_line(qtasks("worker", "integration.apps:app", "--broker", "memory://x"))
    assert "no other process can reach it" in explicit


def test_a_worker_says_when_the_app_ignores_broker(tmp_path: Path) -> None:
    """``--broker`` reaches an app through QTASKS_BROKER_URL; an app built with its own
    URL would silently ignore the flag, so the worker refuses and says why."""
    (tmp_path / "fixed_app.py").write_text(
        "from qtasks import QueueTasks\n"
        "app = QueueTasks('amqp://guest:pw@127.0.0.1:1/')\n")
    line = one_line(qtasks("worker", "fixed_app:app", "--broker",
                           f"nats://127.0.0.1:{free_port()}", cwd=tmp_path))
    assert "--broker" in line and "was built with amqp://guest:***@127.0.0.1:1/" in line
    assert "pw" not in line


def test_option_errors_from_the_core() -> None:
    line = one_line(qtasks("send", "add", "--broker", "memory://", "--queue", ""))
    assert line.startswith("qtasks: queue must be a non-empty string, not ")


def test_send_wait_past_its_timeout_names_the_task() -> None:
    """No worker on this memory:// broker: the wait runs out (exit 3), the id is named."""
    result = qtasks("send", "add", "--args", "[1, 2]", "--broker", "memory://", "--wait",
                    "--timeout", "0.5")
    task_id = result.stdout.split()[-1]
    line = one_line(result, status=3)
    assert line == f"qtasks: task {task_id} did not finish within 0.5 s (it goes on running)"


@pytest.mark.parametrize("scheme", ["amqp", "nats"])
@pytest.mark.parametrize("command", ["status", "worker"])
def test_an_unreachable_broker_is_one_line(scheme: str, command: str) -> None:
    url = f"{scheme}://user:s3cret@127.0.0.1:{free_port()}/"
    args = ("status", "x") if command == "status" else ("worker", "integration.apps:app")
    began = time.monotonic()
    result = qtasks(*args, "--broker", url, "--connect-timeout", "1", timeout=30)
    line = one_line(result)
    assert re.match(r"qtasks: cannot (connect|reach)", line), line
    assert "Connection refused" in line and "s3cret" not in line
    assert time.monotonic() - began < 20


def test_dead_purge_needs_yes_without_a_terminal() -> None:
    result = qtasks("dead", "purge", "--broker", "memory://")
    assert "pass --yes" in one_line(result)
    assert qtasks("dead", "purge", "--yes", "--broker", "memory://").stdout == "purged 0\n"


@pytest.mark.parametrize(("answer", "status", "said"), [
    (b"n\n", 1, "nothing purged"), (b"y\n", 0, "purged 0")])
def test_dead_purge_asks_on_a_terminal(answer: bytes, status: int, said: str) -> None:
    controller, terminal = pty.openpty()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qtasks", "dead", "purge", "--broker", "memory://"],
            stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
            env=clean)
        os.write(controller, answer)
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(controller)
        os.close(terminal)
    assert proc.returncode == status, err
    assert "purge 0 dead letter(s) for good? [y/N]" in err.decode()
    assert said in (out + err).decode()


def test_dead_requeue_of_an_unknown_ref_exits_non_zero() -> None:
    result = qtasks("dead", "requeue", "0123456789abcdef", "--broker", "memory://")
    assert "no dead letter 0123456789abcdef" in one_line(result, status=1)
    assert result.stdout == "requeued 0\n"
