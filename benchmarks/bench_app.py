"""The app the benchmark's worker processes run (``python -m qtasks worker
benchmarks.bench_app:app``) and its producers import.

Its broker and result store come from ``QTASKS_BROKER_URL`` / ``QTASKS_RESULTS_URL`` (the
harness gives each measurement URLs with its own ``prefix``); unset, it is ``memory://``
with an embedded worker, which ``BENCH_EMBEDDED_WORKER=0`` turns off (to measure enqueueing
alone).

``BENCH_OBSERVE=1`` (in the harness's environment, which every child inherits) installs the
observability middleware in every process that imports this app, producers and workers:
``PrometheusMiddleware`` (not served: the cost measured is the hooks') and
``TracingMiddleware`` on an SDK ``TracerProvider`` that samples every span and exports
through a ``BatchSpanProcessor`` to an exporter that drops them, so the figures compare
"metrics and tracing on" against "off" with no collector in the way.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

from qtasks import Middleware, QueueTasks


def observing() -> list[Middleware]:
    """The middleware ``BENCH_OBSERVE=1`` turns on (none otherwise); ``metrics`` or
    ``tracing`` turns on only that one, ``tracing=0.1`` samples one trace in ten."""
    observe = os.environ.get("BENCH_OBSERVE", "0")
    if observe in ("", "0"):
        return []
    from collections.abc import Sequence

    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    from qtasks.metrics import PrometheusMiddleware
    from qtasks.tracing import TracingMiddleware

    class Dropped(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    chosen: list[Middleware] = []
    if observe in ("1", "metrics"):
        chosen.append(PrometheusMiddleware())
    if observe == "1" or observe.startswith("tracing"):
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        ratio = float(observe.partition("=")[2] or 1.0)
        provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
        provider.add_span_processor(BatchSpanProcessor(Dropped()))
        chosen.append(TracingMiddleware(tracer_provider=provider))
    return chosen


app = QueueTasks(embedded_worker=False if os.environ.get("BENCH_EMBEDDED_WORKER") == "0"
                 else None, middleware=observing())


@app.task
async def noop() -> None:
    """Nothing: the cost of a task is the framework's."""


#: ``burst`` stamps in 0.1 ms ticks modulo 100 s: six digits at most, so the final of
#: 100,000 yields (every value, as ``returning``) stays under NATS's 1 MB max_payload.
TICKS_PER_S, TICKS_WRAP = 10_000, 1_000_000


def ticks(now: float) -> int:
    return int(now * TICKS_PER_S) % TICKS_WRAP


def ticks_lag(now: float, stamp: int) -> float:
    """Seconds from a ``burst`` stamp to ``now`` (the stamp is less than 100 s old)."""
    return ((ticks(now) - stamp) % TICKS_WRAP) / TICKS_PER_S


@app.task
async def burst(n: int) -> AsyncIterator[int]:
    """Yields its own time stamp (``ticks``) ``n`` times as fast as the worker takes them,
    never awaiting in between: the burst whose partials must not be held back."""
    for _ in range(n):
        yield ticks(time.time())


@app.task
async def stamps(n: int, rate: float) -> AsyncIterator[float]:
    """Yields its own ``time.time()`` ``n`` times, paced at ``rate`` yields/s."""
    start = time.monotonic()
    for i in range(n):
        wait = start + i / rate - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        yield time.time()
