"""TracingMiddleware on the memory backends, with the SDK's in-memory exporter: the spans'
names, kinds, parents, attributes and events; that ``import qtasks`` never loads
opentelemetry; that no span is left open when a hook or a publish fails."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from qtasks import QueueTasks, RetryPolicy, TaskMessage, current_task
from qtasks.tracing import TracingMiddleware

DEADLINE = 10


class Traced:
    """An SDK provider (never the global one: a test must not change it for others)
    whose finished spans land in memory."""

    def __init__(self, **options: Any) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.middleware = TracingMiddleware(tracer_provider=self.provider, **options)
        self.tracer = self.provider.get_tracer("test")

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name in (None, s.name)]

    def one(self, name: str) -> ReadableSpan:
        found = self.spans(name)
        assert len(found) == 1, [s.name for s in self.spans()]
        return found[0]


@pytest.fixture
def traced() -> Iterator[Traced]:
    traced = Traced()
    yield traced
    traced.provider.shutdown()


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_a_run_span_is_the_child_of_the_send_span_which_is_the_callers(
        traced: Traced) -> None:
    app = QueueTasks(middleware=[traced.middleware])

    @app.task(queue="streams")
    async def count(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i

    async with app:
        with traced.tracer.start_as_current_span("caller") as caller:
            task = await count.add_task(3)
        await task.wait(DEADLINE)
    send, run = traced.one("send count"), traced.one("run count")
    trace_id = caller.get_span_context().trace_id
    assert {s.context.trace_id for s in (send, run)} == {trace_id}
    assert parent_of(send) == caller.get_span_context().span_id
    assert parent_of(run) == send.context.span_id
    assert (send.kind, run.kind) == (SpanKind.PRODUCER, SpanKind.CONSUMER)
    assert dict(send.attributes or {}) == {
        "messaging.system": "qtasks", "messaging.operation.type": "send",
        "messaging.operation.name": "send", "messaging.destination.name": "streams",
        "messaging.message.id": task.id, "qtasks.task.name": "count",
        "qtasks.task.attempt": 1}
    assert dict(run.attributes or {}) == {
        "messaging.system": "qtasks", "messaging.operation.type": "process",
        "messaging.operation.name": "run", "messaging.destination.name": "streams",
        "messaging.message.id": task.id, "messaging.client.id": "embedded",
        "qtasks.task.name": "count", "qtasks.task.attempt": 1,
        "qtasks.task.outcome": "success", "qtasks.task.partials": 3}
    assert [(e.name, dict(e.attributes or {})) for e in run.events] == [
        ("partial", {"qtasks.partial.seq": i}) for i in range(3)]
    assert run.status.status_code is StatusCode.UNSET


async def test_the_traceparent_header_is_w3c_and_reaches_the_task(traced: Traced) -> None:
    app = QueueTasks(middleware=[traced.middleware])

    @app.task
    async def headers() -> dict[str, str]:
        return dict(current_task().headers)

    async with app:
        done = await headers.add_task(timeout=DEADLINE)
    send = traced.one("send headers")
    version, trace_id, span_id, flags = done.returning["traceparent"].split("-")
    assert version == "00" and int(flags, 16) & 1  # sampled
    assert int(trace_id, 16) == send.context.trace_id
    assert int(span_id, 16) == send.context.span_id


async def test_spans_the_tasks_own_code_starts_are_children_of_its_run_span(
        traced: Traced) -> None:
    app = QueueTasks(middleware=[traced.middleware])
    tracer = traced.tracer

    @app.task
    async def in_async() -> None:
        with tracer.start_as_current_span("async work"):
            pass

    @app.task
    def in_sync() -> bool:
        with tracer.start_as_current_span("sync work"):
            pass
        return threading.current_thread() is not threading.main_thread()

    async with app:
        await in_async.add_task(timeout=DEADLINE)
        assert (await in_sync.add_task(timeout=DEADLINE)).returning is True
    assert parent_of(traced.one("async work")) == traced.one("run in_async").context.span_id
    assert parent_of(traced.one("sync work")) == traced.one("run in_sync").context.span_id
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing left attached here


async def test_a_retry_is_a_new_run_span_in_the_same_trace_and_errors_are_recorded(
        traced: Traced) -> None:
    app = QueueTasks(middleware=[traced.middleware])

    @app.task(retry=RetryPolicy(retries=1, backoff=0.01, jitter=0))
    async def flaky() -> int:
        if current_task().attempt == 1:
            raise ValueError("first attempt fails")
        return 2

    @app.task
    async def fails() -> None:
        raise KeyError("nope")

    async with app:
        await flaky.add_task(timeout=DEADLINE)
        await (await fails.add_task()).wait(DEADLINE)
    runs = sorted(traced.spans("run flaky"), key=lambda s: s.start_time or 0)
    sends = sorted(traced.spans("send flaky"), key=lambda s: s.start_time or 0)
    assert len(runs) == 2 and len(sends) == 2
    assert len({s.context.trace_id for s in runs + sends}) == 1
    first, second = runs
    # producer -> run 1 -> the retry's send (published from inside run 1) -> run 2
    assert parent_of(first) == sends[0].context.span_id
    assert parent_of(sends[1]) == first.context.span_id
    assert parent_of(second) == sends[1].context.span_id
    assert sends[1].attributes is not None and sends[1].attributes["qtasks.task.attempt"] == 2
    assert first.attributes is not None and second.attributes is not None
    assert (first.attributes["qtasks.task.attempt"], first.attributes["qtasks.task.outcome"],
            first.attributes["error.type"]) == (1, "retry", "ValueError")
    assert (second.attributes["qtasks.task.attempt"],
            second.attributes["qtasks.task.outcome"]) == (2, "success")
    assert first.status.status_code is StatusCode.ERROR
    assert second.status.status_code is StatusCode.UNSET
    failed = traced.one("run fails")
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "KeyError: 'nope'"
    [event] = failed.events
    assert event.name == "exception" and event.attributes is not None
    assert event.attributes["exception.type"] == "KeyError"
    assert "raise KeyError" in str(event.attributes["exception.stacktrace"])


async def test_a_cancelled_run_says_so_without_being_an_error(traced: Traced) -> None:
    app = QueueTasks(middleware=[traced.middleware])
    started = asyncio.Event()

    @app.task
    async def held() -> None:
        started.set()
        await asyncio.Event().wait()

    async with app:
        task = await held.add_task()
        await asyncio.wait_for(started.wait(), DEADLINE)
        await app.cancel(task.id, reason="enough")
        await task.wait(DEADLINE)
    run = traced.one("run held")
    assert run.attributes is not None
    assert run.attributes["qtasks.task.outcome"] == "cancelled"
    assert run.status.status_code is StatusCode.UNSET
    assert [e.name for e in run.events] == ["exception"]
    assert "enough" in str((run.events[0].attributes or {})["exception.message"])


async def test_partial_events_are_capped_and_counted() -> None:
    traced = Traced(max_partial_events=5)
    app = QueueTasks(middleware=[traced.middleware])

    @app.task
    async def many(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i

    async with app:
        await many.add_task(50, timeout=DEADLINE)
    run = traced.one("run many")
    assert [(e.attributes or {})["qtasks.partial.seq"] for e in run.events] == [0, 1, 2, 3, 4]
    assert run.attributes is not None and run.attributes["qtasks.task.partials"] == 50
    with pytest.raises(ValueError, match="max_partial_events"):
        TracingMiddleware(max_partial_events=-1)


async def test_no_span_is_left_open_when_a_hook_fails_midway(traced: Traced) -> None:
    class Failing(TracingMiddleware):
        def after_run(self, context: Any, outcome: Any) -> None:
            outcome = None  # set_attribute(outcome.status) raises inside after_run
            super().after_run(context, outcome)

    failing = Failing(tracer_provider=traced.provider)
    app = QueueTasks(middleware=[failing])

    @app.task
    async def fine() -> int:
        return 1

    async with app:
        assert (await fine.add_task(timeout=DEADLINE)).returning == 1
    assert traced.one("run fine").end_time is not None  # ended despite the failure
    assert trace.get_current_span() is trace.INVALID_SPAN  # and detached


def test_a_send_span_whose_publish_never_completed_is_ended_later(traced: Traced) -> None:
    middleware = TracingMiddleware(tracer_provider=traced.provider, publish_timeout=0.0)
    lost = TaskMessage(id="lost", task="t")
    middleware.before_publish(lost)  # the broker refused it: no after_publish
    assert traced.spans() == []
    middleware.before_publish(TaskMessage(id="next", task="t"))
    [ended] = traced.spans()
    assert ended.attributes is not None and ended.attributes["messaging.message.id"] == "lost"
    assert ended.status.status_code is StatusCode.ERROR


def test_import_qtasks_does_not_load_opentelemetry() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import qtasks, qtasks.cli, qtasks.metrics, sys; "
         "assert not [m for m in sys.modules if m.startswith('opentelemetry')]"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_without_opentelemetry_the_error_says_which_extra_to_install() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['opentelemetry'] = None\n"
         "import qtasks.tracing"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "install qtasks[otel]" in done.stderr


def test_the_blocking_api_publishes_under_the_calling_threads_span(traced: Traced) -> None:
    app = QueueTasks(middleware=[traced.middleware])

    @app.task
    async def one() -> int:
        return 1

    try:
        with traced.tracer.start_as_current_span("request") as request:
            assert app.sync.add_task("one", timeout=DEADLINE).returning == 1
    finally:
        app.sync.close()
    send = traced.one("send one")
    assert parent_of(send) == request.get_span_context().span_id
    assert parent_of(traced.one("run one")) == send.context.span_id
