"""Metrics and traces across a producer and a real CLI worker process, on both real
brokers: the worker's /metrics scraped over HTTP, and its spans (written to a file by the
app module it runs) joined to the producer's in one trace."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from integration.conftest import NATS_URL, RABBITMQ_URL, require_server
from integration.processes import WorkerProcess
from qtasks import Middleware, QueueTasks, TaskStatus
from qtasks.tracing import TracingMiddleware

DEADLINE = 60.0
APP = "integration.observed_app:app"
T = TypeVar("T")


@dataclass
class Broker:
    name: str
    url: str  # broker and results, with this test's prefix

    def env(self, **extra: str) -> dict[str, str]:
        return {"QTASKS_BROKER_URL": self.url, "QTASKS_RESULTS_URL": self.url,
                "QTASKS_LOG_LEVEL": "INFO", **extra}

    def producer(self, *middleware: Middleware) -> QueueTasks:
        return QueueTasks(broker=self.url, results=self.url, embedded_worker=False,
                          middleware=middleware)


@pytest.fixture(params=["rabbitmq", "nats"])
def broker(request: pytest.FixtureRequest, prefix: str) -> Iterator[Broker]:
    if request.param == "rabbitmq":
        require_server("RabbitMQ", 5672)
        from integration.rabbitmq_support import delete_namespace_sync as cleanup
        base = RABBITMQ_URL
    else:
        require_server("NATS", 4222)
        from integration.nats_support import delete_namespace_sync as cleanup
        base = NATS_URL
    try:
        yield Broker(request.param, f"{base}?prefix={prefix}")
    finally:
        cleanup(base, prefix)


@pytest.fixture
def worker_of() -> Iterator[Callable[..., WorkerProcess]]:
    """Starts CLI workers of the observed app, waits until each consumes, always stops
    them (SIGTERM, then kill)."""
    started: list[WorkerProcess] = []

    def start(env: dict[str, str], *extra: str) -> WorkerProcess:
        worker = WorkerProcess(env, app=APP, extra=extra)
        started.append(worker)
        worker.wait_ready(DEADLINE)
        return worker

    yield start
    for worker in started:
        try:
            worker.terminate(timeout=15)
        except Exception:
            worker.kill()


def eventually(probe: Callable[[], T | None], what: str) -> T:
    """``probe()`` until it returns something, within the deadline (another process's
    state: nothing to await but its output)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        found = probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- metrics ---------------------------------------------------------------------------

def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_a_worker_process_serves_its_metrics_over_http(
        broker: Broker, worker_of: Callable[..., WorkerProcess]) -> None:
    worker = worker_of(broker.env(), "--metrics-port", "0")
    found = re.search(r"serving metrics on (http://127\.0\.0\.1:\d+/metrics)", worker.output)
    assert found, worker.output
    url = found.group(1)
    producer = broker.producer()
    async with producer:
        counted = await producer.add_task("countdown", 4)
        assert (await counted.wait(DEADLINE)).returning == [3, 2, 1, 0]
        assert (await (await producer.add_task("flaky")).wait(DEADLINE)).returning == 2
        failed = await (await producer.add_task("fails")).wait(DEADLINE)
        assert failed.status is TaskStatus.ERROR
        unknown = await (await producer.add_task("no_such_task")).wait(DEADLINE)
        assert unknown.status is TaskStatus.ERROR

    def dead_lettered() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        samples = scrape(url)
        return samples if sample(samples, "qtasks_dead_letters_total", queue="default",
                                 reason="unknown_task") == 1 else None

    samples = eventually(dead_lettered, "the unknown task's dead letter in /metrics")

    def finished(task: str, status: str) -> float | None:
        return sample(samples, "qtasks_tasks_finished_total", queue="default", task=task,
                      status=status)

    assert [finished("countdown", s) for s in ("success", "error", "cancelled", "retry")] \
        == [1, 0, 0, 0]
    assert [finished("flaky", s) for s in ("success", "error", "retry")] == [1, 0, 1]
    assert [finished("fails", s) for s in ("success", "error", "retry")] == [0, 1, 0]
    for task, attempts in (("countdown", 1), ("flaky", 2), ("fails", 1)):
        labels = {"queue": "default", "task": task}
        assert sample(samples, "qtasks_tasks_received_total", **labels) == attempts
        assert sample(samples, "qtasks_task_duration_seconds_count", **labels) == attempts
        assert sample(samples, "qtasks_task_queue_seconds_count", **labels) == attempts
    assert sample(samples, "qtasks_partials_published_total", queue="default",
                  task="countdown") == 4
    assert sample(samples, "qtasks_tasks_in_progress", queue="default") == 0
    assert sample(samples, "qtasks_tasks_received_total", queue="default",
                  task="no_such_task") is None


# -- traces ----------------------------------------------------------------------------

def read_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [orjson.loads(line) for line in lines if line.endswith("}")]


def span_id(span: dict[str, Any]) -> int:
    return int(span["context"]["span_id"], 16)


def trace_id(span: dict[str, Any]) -> int:
    return int(span["context"]["trace_id"], 16)


def parent(span: dict[str, Any]) -> int | None:
    return int(span["parent_id"], 16) if span["parent_id"] else None


async def test_the_worker_processs_run_spans_join_the_producers_trace(
        broker: Broker, worker_of: Callable[..., WorkerProcess], tmp_path: Path) -> None:
    spans_file = tmp_path / "worker-spans.jsonl"
    worker_of(broker.env(QTASKS_TEST_SPANS=str(spans_file)))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    producer = broker.producer(TracingMiddleware(tracer_provider=provider))
    async with producer:
        with provider.get_tracer("test").start_as_current_span("caller"):
            counted = await producer.add_task("countdown", 3)
            flaky = await producer.add_task("flaky")
        await counted.wait(DEADLINE)
        await flaky.wait(DEADLINE)
    provider.shutdown()
    sent = {s.name: s for s in exporter.get_finished_spans()}

    def worker_spans() -> dict[str, list[dict[str, Any]]] | None:
        by_name: dict[str, list[dict[str, Any]]] = {}
        for span in read_spans(spans_file):
            by_name.setdefault(span["name"], []).append(span)
        done = len(by_name.get("run countdown", ())) == 1 \
            and len(by_name.get("run flaky", ())) == 2
        return by_name if done else None

    spans = eventually(worker_spans, "the worker's run spans in its span file")
    caller = sent["caller"].context

    [run] = spans["run countdown"]
    send = sent["send countdown"]
    assert run["kind"] == "SpanKind.CONSUMER"
    assert trace_id(run) == send.context.trace_id == caller.trace_id
    assert parent(run) == send.context.span_id
    attributes = run["attributes"]
    assert {k: attributes[k] for k in ("messaging.message.id", "messaging.destination.name",
                                        "qtasks.task.attempt", "qtasks.task.outcome",
                                        "qtasks.task.partials")} == {
        "messaging.message.id": counted.id, "messaging.destination.name": "default",
        "qtasks.task.attempt": 1, "qtasks.task.outcome": "success",
        "qtasks.task.partials": 3}
    assert [(e["name"], e["attributes"]) for e in run["events"]] == [
        ("partial", {"qtasks.partial.seq": i}) for i in range(3)]

    first, second = sorted(spans["run flaky"], key=lambda s: s["attributes"]["qtasks.task.attempt"])
    assert {trace_id(first), trace_id(second)} == {caller.trace_id}
    assert parent(first) == sent["send flaky"].context.span_id
    assert (first["attributes"]["qtasks.task.outcome"], first["status"]["status_code"]) == (
        "retry", "ERROR")
    assert second["attributes"]["qtasks.task.attempt"] == 2
    assert second["attributes"]["qtasks.task.outcome"] == "success"
    # The retry's send span, made in the worker inside the first run, parents the second.
    [resend] = spans["send flaky"]
    assert parent(resend) == span_id(first)
    assert parent(second) == span_id(resend)
