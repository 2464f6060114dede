"""PrometheusMiddleware on the memory backends: the exact names, labels and values, the
CLI's --metrics-port checks, and that ``import qtasks`` never loads prometheus_client."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from qtasks import QueueTasks, RetryPolicy, TaskMessage, current_task
from qtasks.cli import serve_metrics
from qtasks.cli_args import build_parser, resolve
from qtasks.errors import ConfigurationError
from qtasks.metrics import PrometheusMiddleware

DEADLINE = 10


def value(metrics: PrometheusMiddleware, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (the check still names it)."""
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def finished(metrics: PrometheusMiddleware, task: str, queue: str = "default") -> dict[str, float]:
    return {status: value(metrics, "qtasks_tasks_finished_total", queue=queue, task=task,
                          status=status)
            for status in ("success", "error", "cancelled", "retry")}


async def test_a_generator_task_is_received_finished_timed_and_its_partials_counted() -> None:
    metrics = PrometheusMiddleware()
    app = QueueTasks(middleware=[metrics])
    in_progress: list[float] = []

    @app.task(queue="streams")
    async def count(n: int):  # type: ignore[no-untyped-def]
        in_progress.append(value(metrics, "qtasks_tasks_in_progress", queue="streams"))
        for i in range(n):
            yield i

    async with app:
        await count.add_task(5, timeout=DEADLINE)
        await count.add_task(2, timeout=DEADLINE)
    labels = {"queue": "streams", "task": "count"}
    assert value(metrics, "qtasks_tasks_received_total", **labels) == 2
    assert finished(metrics, "count", "streams") == {
        "success": 2, "error": 0, "cancelled": 0, "retry": 0}
    assert value(metrics, "qtasks_partials_published_total", **labels) == 7
    assert value(metrics, "qtasks_task_duration_seconds_count", **labels) == 2
    assert 0 < value(metrics, "qtasks_task_duration_seconds_sum", **labels) < DEADLINE
    assert value(metrics, "qtasks_task_queue_seconds_count", **labels) == 2
    assert 0 <= value(metrics, "qtasks_task_queue_seconds_sum", **labels) < DEADLINE
    assert in_progress == [1, 1]  # seen from inside the running task
    assert value(metrics, "qtasks_tasks_in_progress", queue="streams") == 0
    assert value(metrics, "qtasks_tasks_in_progress", queue="default") == 0  # exported at 0


async def test_failed_retried_and_cancelled_attempts_each_have_their_status() -> None:
    metrics = PrometheusMiddleware()
    app = QueueTasks(middleware=[metrics])
    started = asyncio.Event()

    @app.task
    async def fails() -> None:
        raise KeyError("nope")

    @app.task(retry=RetryPolicy(retries=2, backoff=0.01, jitter=0))
    async def flaky() -> int:
        if current_task().attempt < 3:
            raise ValueError("not yet")
        return current_task().attempt

    @app.task
    async def held() -> None:
        started.set()
        await asyncio.Event().wait()

    async with app:
        await (await fails.add_task()).wait(DEADLINE)
        assert (await flaky.add_task(timeout=DEADLINE)).returning == 3
        task = await held.add_task()
        await asyncio.wait_for(started.wait(), DEADLINE)
        await app.cancel(task.id)
        await task.wait(DEADLINE)
    assert finished(metrics, "fails") == {"success": 0, "error": 1, "cancelled": 0, "retry": 0}
    assert finished(metrics, "flaky") == {"success": 1, "error": 0, "cancelled": 0, "retry": 2}
    assert finished(metrics, "held") == {"success": 0, "error": 0, "cancelled": 1, "retry": 0}
    assert value(metrics, "qtasks_tasks_received_total", queue="default", task="flaky") == 3
    assert value(metrics, "qtasks_task_duration_seconds_count", queue="default",
                 task="flaky") == 3
    assert value(metrics, "qtasks_tasks_in_progress", queue="default") == 0


async def test_a_retry_waits_from_its_due_time_not_from_the_first_publish() -> None:
    metrics = PrometheusMiddleware()
    app = QueueTasks(middleware=[metrics])

    @app.task(retry=RetryPolicy(retries=1, backoff=0.5, jitter=0))
    async def slow_retry() -> None:
        if current_task().attempt == 1:
            raise ValueError("again")

    async with app:
        await slow_retry.add_task(timeout=DEADLINE)
    labels = {"queue": "default", "task": "slow_retry"}
    assert value(metrics, "qtasks_task_queue_seconds_count", **labels) == 2
    # Two waits, neither of which counts the 0.5 s back-off the retry was delayed by.
    assert value(metrics, "qtasks_task_queue_seconds_sum", **labels) < 0.5


async def test_dead_letters_are_counted_by_queue_and_short_reason() -> None:
    metrics = PrometheusMiddleware()
    app = QueueTasks(f"memory://{uuid.uuid4().hex}", middleware=[metrics])
    async with app:
        await app.broker.publish(TaskMessage(id="x", task="nothing"), b"not json")
        unknown = await app.add_task("no_such_task")
        await unknown.wait(DEADLINE)
        async with asyncio.timeout(DEADLINE):
            while value(metrics, "qtasks_dead_letters_total", queue="default",  # noqa: ASYNC110
                        reason="undecodable") < 1:
                await asyncio.sleep(0.01)  # bounded poll: the bad body has no task to await
    assert value(metrics, "qtasks_dead_letters_total", queue="default",
                 reason="unknown_task") == 1
    assert value(metrics, "qtasks_dead_letters_total", queue="default",
                 reason="undecodable") == 1
    # An unknown task never ran: it is a dead letter, not a received task.
    assert value(metrics, "qtasks_tasks_received_total", queue="default",
                 task="no_such_task") == 0


async def test_two_apps_in_one_process_do_not_clash_and_a_registry_can_be_shared() -> None:
    first, second = PrometheusMiddleware(), PrometheusMiddleware()
    assert first.registry is not second.registry
    shared = CollectorRegistry()
    mine = PrometheusMiddleware(registry=shared)
    assert mine.registry is shared
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        PrometheusMiddleware(registry=shared)  # prometheus_client refuses a name twice


async def test_the_metrics_server_serves_the_exposition_over_http() -> None:
    metrics = PrometheusMiddleware()
    app = QueueTasks(middleware=[metrics])

    @app.task
    async def ping() -> str:
        return "pong"

    async with app:
        await ping.add_task(timeout=DEADLINE)
    server = metrics.serve(0)
    try:
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        body = await asyncio.to_thread(fetch, server.url)
    finally:
        server.close()
    assert 'qtasks_tasks_finished_total{queue="default",status="success",task="ping"} 1.0' \
        in body
    assert "# TYPE qtasks_task_duration_seconds histogram" in body


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=DEADLINE) as response:
        return str(response.read().decode())


def test_a_taken_port_is_a_configuration_error_naming_it() -> None:
    metrics = PrometheusMiddleware()
    server = metrics.serve(0)
    try:
        with pytest.raises(ConfigurationError, match=f"cannot serve metrics on "
                                                     f"127.0.0.1:{server.port}"):
            PrometheusMiddleware().serve(server.port)
    finally:
        server.close()


def test_the_cli_adds_one_prometheus_middleware_or_serves_the_apps_own() -> None:
    app = QueueTasks()
    before = app.runtime.middleware
    stop = serve_metrics(app, 0, "127.0.0.1")
    try:
        added = [m for m in before.middleware if isinstance(m, PrometheusMiddleware)]
        assert len(added) == 1
        assert before._calls["on_partial"] and not before._calls["before_publish"]
    finally:
        stop()
    own = PrometheusMiddleware()
    app = QueueTasks(middleware=[own])
    stop = serve_metrics(app, 0, "127.0.0.1")
    stop()
    assert app.runtime.middleware.middleware == (own,)


def test_metrics_port_flag_and_environment_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    args = resolve(parser.parse_args(["worker", "m:app", "--metrics-port", "9100"]))
    assert (args.metrics_port, args.metrics_host) == (9100, "127.0.0.1")
    assert resolve(parser.parse_args(["worker", "m:app"])).metrics_port is None
    monkeypatch.setenv("QTASKS_METRICS_PORT", "9200")
    assert resolve(parser.parse_args(["worker", "m:app"])).metrics_port == 9200
    monkeypatch.setenv("QTASKS_METRICS_PORT", "http")
    with pytest.raises(ConfigurationError, match="QTASKS_METRICS_PORT='http'"):
        resolve(parser.parse_args(["worker", "m:app"]))
    for bad in ("-1", "65536", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["worker", "m:app", "--metrics-port", bad])


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parent.parent)


def test_import_qtasks_does_not_load_prometheus_client() -> None:
    done = run_python("import qtasks, qtasks.cli, sys; "
                      "assert 'prometheus_client' not in sys.modules, 'loaded'")
    assert done.returncode == 0, done.stderr


def test_without_prometheus_client_the_worker_says_which_extra_to_install() -> None:
    # sys.modules[name] = None makes every import of it fail, as when it is not installed.
    done = run_python(
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from qtasks.cli import main\n"
        "sys.exit(main(['worker', 'integration.apps:app', '--broker', "
        "'amqp://guest:guest@127.0.0.1:1/', '--metrics-port', '0']))")
    assert done.returncode == 2, done.stderr
    assert "install qtasks[metrics]" in done.stderr
    assert "Traceback" not in done.stderr

