"""The app the observability tests' CLI worker processes run.

Its broker and result store come from ``QTASKS_BROKER_URL`` / ``QTASKS_RESULTS_URL``. With
``QTASKS_TEST_SPANS`` set to a file path it traces (``TracingMiddleware``) through an SDK
provider that writes every finished span to that file as one JSON line, so that a test in
another process can read the worker's spans. Metrics come from the worker's own
``--metrics-port`` flag, as a user would turn them on.
"""

from __future__ import annotations

import os
from typing import IO

from qtasks import Middleware, QueueTasks, RetryPolicy, current_task


def _tracing() -> list[Middleware]:
    path = os.environ.get("QTASKS_TEST_SPANS")
    if not path:
        return []
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    from qtasks.tracing import TracingMiddleware

    out: IO[str] = open(path, "a", encoding="utf-8")  # open for the process's life

    def one_line(span: ReadableSpan) -> str:
        return span.to_json(indent=None) + "\n"

    provider = TracerProvider()
    # Simple (not batched): each span is in the file once it ends, which a test waits on.
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=out,
                                                                        formatter=one_line)))
    return [TracingMiddleware(tracer_provider=provider)]


app = QueueTasks(middleware=_tracing())


@app.task
async def countdown(n: int):  # type: ignore[no-untyped-def]
    """Yields n-1 ... 0."""
    for i in reversed(range(n)):
        yield i


@app.task(retry=RetryPolicy(retries=1, backoff=0.01, jitter=0))
async def flaky() -> int:
    """Fails its first attempt, succeeds on its retry."""
    if current_task().attempt == 1:
        raise ValueError("the first attempt fails")
    return current_task().attempt


@app.task
async def fails() -> None:
    raise KeyError("always")
