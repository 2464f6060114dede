"""OpenTelemetry tracing, as a middleware (the ``otel`` extra: the API only; the
application brings the SDK and its exporter, as OpenTelemetry intends for libraries).

``QueueTasks(middleware=[TracingMiddleware()])`` on both sides gives one trace per task:

- the producer's ``add_task`` makes a PRODUCER span ``send <task>``, a child of whatever
  span is current there, and carries its context in the message's headers (W3C
  ``traceparent``/``tracestate``, through the global propagator);
- the worker runs each attempt in a CONSUMER span ``run <task>``, a child of that span,
  and makes it current while the task runs: spans the task's own code starts are its
  children (a sync task's thread runs in a copy of that context, so there too);
- each partial is an event of the run span (the first ``max_partial_events``; the rest are
  counted in ``qtasks.task.partials``); an error is an ``exception`` event and the span's
  status ERROR;
- a retry is published from inside the failed attempt's span, so its ``send`` span, and
  the next attempt's ``run`` span below it, are in the same trace.

Attributes follow OpenTelemetry's messaging semantic conventions (``messaging.system``,
``messaging.destination.name`` = the queue, ``messaging.message.id`` = the task id,
``messaging.operation.type``/``name``, ``messaging.client.id`` = the worker, ``error.type``)
plus ``qtasks.task.name``, ``qtasks.task.attempt``, ``qtasks.task.outcome`` and
``qtasks.task.partials``. ``docs/observability.md`` shows a trace.

Spans never leak: a run span is ended and its context detached in ``after_run`` whatever
fails there, and a send span whose publish never completed (``after_publish`` is not
called when the broker refuses) is ended with an error once it is ``publish_timeout``
seconds old.
"""

from __future__ import annotations

import logging
import time
from contextvars import Token
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(f"qtasks.tracing needs opentelemetry-api: install qtasks[otel] "
                      f"({exc})") from exc

from qtasks.context import TaskContext
from qtasks.middleware import Middleware, Outcome
from qtasks.protocol import ErrorInfo, TaskMessage

log = logging.getLogger(__name__)

#: Outcomes that are failures of the attempt: the span's status is ERROR.
_FAILED = frozenset({"error", "retry"})


def _library_version() -> str:
    try:
        return version("qtasks")
    except PackageNotFoundError:  # pragma: no cover - a source tree never installed
        return "0"


@dataclass(slots=True)
class _Run:
    """One attempt's span and the context token that made it current."""

    span: Span
    token: Token[Context]
    events: int = 0


class TracingMiddleware(Middleware):
    """A ``send`` span per publish, a ``run`` span per attempt, in one trace per task."""

    def __init__(self, tracer_provider: TracerProvider | None = None, *,
                 system: str = "qtasks", max_partial_events: int = 100,
                 publish_timeout: float = 60.0) -> None:
        """``tracer_provider``: the global one (``trace.set_tracer_provider``) unless given.
        ``system``: ``messaging.system``; the conventions name the broker (``rabbitmq``,
        ``nats``), which a middleware cannot know, so say it here if you want it."""
        if max_partial_events < 0:
            raise ValueError(f"max_partial_events must be 0 or more, not {max_partial_events}")
        self.tracer = trace.get_tracer("qtasks", _library_version(),
                                       tracer_provider=tracer_provider)
        self.system = system
        self.max_partial_events = max_partial_events
        self.publish_timeout = publish_timeout
        #: Send spans between before_publish and after_publish, by id(message); oldest
        #: first (a dict keeps insertion order), so the stale ones are found at its head.
        self._sending: dict[int, tuple[TaskMessage, Span, float]] = {}
        self._key = object()

    # -- producer side -------------------------------------------------------------

    def before_publish(self, message: TaskMessage) -> None:
        now = time.monotonic()
        self._end_stale(now)
        span = self.tracer.start_span(
            f"send {message.task}", kind=SpanKind.PRODUCER,
            attributes={"messaging.system": self.system,
                        "messaging.operation.type": "send",
                        "messaging.operation.name": "send",
                        "messaging.destination.name": message.queue,
                        "messaging.message.id": message.id,
                        "qtasks.task.name": message.task,
                        "qtasks.task.attempt": message.attempt})
        self._sending[id(message)] = (message, span, now)
        propagate.inject(message.headers, context=trace.set_span_in_context(span))

    def after_publish(self, message: TaskMessage) -> None:
        sending = self._sending.pop(id(message), None)
        if sending is not None and sending[0] is message:
            sending[1].end()

    def _end_stale(self, now: float) -> None:
        while self._sending:
            key, (_, span, since) = next(iter(self._sending.items()))
            if now - since < self.publish_timeout:
                return
            del self._sending[key]
            span.set_status(Status(StatusCode.ERROR, "the publish was not confirmed"))
            span.end()

    # -- worker side ---------------------------------------------------------------

    def before_run(self, context: TaskContext) -> None:
        parent = propagate.extract(context.headers)
        span = self.tracer.start_span(
            f"run {context.name}", context=parent, kind=SpanKind.CONSUMER,
            attributes={"messaging.system": self.system,
                        "messaging.operation.type": "process",
                        "messaging.operation.name": "run",
                        "messaging.destination.name": context.queue,
                        "messaging.message.id": context.id,
                        "messaging.client.id": context.worker,
                        "qtasks.task.name": context.name,
                        "qtasks.task.attempt": context.attempt})
        try:
            token = otel_context.attach(trace.set_span_in_context(span, parent))
        except BaseException:
            span.end()
            raise
        context.state[self._key] = _Run(span, token)

    def on_partial(self, context: TaskContext, seq: int, value: Any) -> None:
        run = context.state.get(self._key)
        if run is not None and run.events < self.max_partial_events:
            run.events += 1
            run.span.add_event("partial", {"qtasks.partial.seq": seq})

    def after_run(self, context: TaskContext, outcome: Outcome) -> None:
        run: _Run | None = context.state.pop(self._key, None)
        if run is None:
            return
        span = run.span
        try:
            span.set_attribute("qtasks.task.outcome", outcome.status)
            span.set_attribute("qtasks.task.partials", outcome.partials)
            if outcome.error is not None:
                _record(span, outcome.error)
                if outcome.status in _FAILED:
                    span.set_attribute("error.type", outcome.error.type)
                    span.set_status(Status(StatusCode.ERROR,
                                           f"{outcome.error.type}: {outcome.error.message}"))
        finally:
            try:
                span.end()
            finally:
                otel_context.detach(run.token)


def _record(span: Span, error: ErrorInfo) -> None:
    """What ``span.record_exception`` writes, from the error the final carries (the
    exception object itself is gone by ``after_run``)."""
    span.add_event("exception", {"exception.type": error.type,
                                 "exception.message": error.message,
                                 "exception.stacktrace": error.traceback})
