"""Prometheus metrics for workers, as a middleware (the ``metrics`` extra).

``QueueTasks(middleware=[PrometheusMiddleware()])`` counts what a worker of that app
does; ``qtasks worker --metrics-port PORT`` installs one and serves it on ``/metrics``.
The names and labels below are fixed so that dashboards and alerts can rely on them
(``docs/observability.md`` lists them with PromQL examples):

- ``qtasks_tasks_received_total{queue,task}``: attempts started
- ``qtasks_tasks_finished_total{queue,task,status}``: attempts ended, ``status`` one of
  ``success``, ``error``, ``cancelled``, ``retry``
- ``qtasks_task_duration_seconds{queue,task}``: histogram of those attempts' wall time
- ``qtasks_task_queue_seconds{queue,task}``: histogram of the wait from when a message
  was due (``created_at``, or its ``not_before`` when delayed) to its attempt's start
- ``qtasks_partials_published_total{queue,task}``
- ``qtasks_tasks_in_progress{queue}``: gauge of attempts running now
- ``qtasks_dead_letters_total{queue,reason}``: ``reason`` a short class, never free text

An attempt the worker gave back unfinished when it stopped (``interrupted``) is no
finish: it only leaves the in-progress gauge.

The metrics live in a registry of their own by default, not prometheus_client's global
one, so that two apps (or two tests) in one process never register a name twice; pass
``registry=`` to share one. The hooks run on the worker's hot path: each looks up the
labelled children of its (queue, task) once per attempt and keeps them in the task's
context, so a partial costs one dictionary read and one increment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.exposition import start_http_server
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(f"qtasks.metrics needs prometheus-client: install qtasks[metrics] "
                      f"({exc})") from exc

from qtasks.context import TaskContext
from qtasks.errors import ConfigurationError
from qtasks.middleware import DeadLettered, Middleware, Outcome, WorkerInfo

log = logging.getLogger(__name__)

#: Finish statuses; each (queue, task) gets all four at 0 when first seen, so that a rate
#: of errors is 0, not absent, before the first error.
FINISHED = ("success", "error", "cancelled", "retry")

#: Seconds: from 5 ms to an hour, tasks being anything from a lookup to a report.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, float("inf"))
#: Seconds a message waited: from a millisecond (an idle worker) to an hour (a backlog).
QUEUE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, float("inf"))


@dataclass(slots=True)
class _TaskSeries:
    """The labelled children of one (queue, task)."""

    received: Any
    finished: dict[str, Any]
    duration: Any
    waited: Any
    partials: Any
    in_progress: Any


class PrometheusMiddleware(Middleware):
    """Counts and times every attempt a worker runs, and every dead letter."""

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 duration_buckets: Sequence[float] = DURATION_BUCKETS,
                 queue_buckets: Sequence[float] = QUEUE_BUCKETS) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        task = ("queue", "task")
        on = self.registry
        self.received = Counter("qtasks_tasks_received", "Task attempts a worker started.",
                                task, registry=on)
        self.finished = Counter("qtasks_tasks_finished",
                                "Task attempts that ended, by status (success, error, "
                                "cancelled, retry).", (*task, "status"), registry=on)
        self.duration = Histogram("qtasks_task_duration_seconds",
                                  "Wall time of a task attempt, from its start to its end.",
                                  task, buckets=duration_buckets, registry=on)
        self.waited = Histogram("qtasks_task_queue_seconds",
                                "Time a task message waited, from when it was due "
                                "(created, or its delay over) to its attempt's start.",
                                task, buckets=queue_buckets, registry=on)
        self.partials = Counter("qtasks_partials_published",
                                "Partial results published by generator tasks.", task,
                                registry=on)
        self.in_progress = Gauge("qtasks_tasks_in_progress", "Task attempts running now.",
                                 ("queue",), registry=on)
        self.dead_letters = Counter("qtasks_dead_letters",
                                    "Messages moved to the dead letters, by short reason.",
                                    ("queue", "reason"), registry=on)
        self._series: dict[tuple[str, str], _TaskSeries] = {}
        self._dead: dict[tuple[str, str], Any] = {}
        #: The key of this middleware's entry in each TaskContext.state.
        self._key = object()

    def _of(self, queue: str, task: str) -> _TaskSeries:
        series = self._series.get((queue, task))
        if series is None:
            series = self._series[(queue, task)] = _TaskSeries(
                received=self.received.labels(queue, task),
                finished={s: self.finished.labels(queue, task, s) for s in FINISHED},
                duration=self.duration.labels(queue, task),
                waited=self.waited.labels(queue, task),
                partials=self.partials.labels(queue, task),
                in_progress=self.in_progress.labels(queue))
        return series

    # -- the hooks -----------------------------------------------------------------

    def worker_start(self, worker: WorkerInfo) -> None:
        for queue in worker.queues:  # 0, not absent, for a queue with nothing running
            self.in_progress.labels(queue)

    def before_run(self, context: TaskContext) -> None:
        series = self._of(context.queue, context.name)
        context.state[self._key] = series
        series.received.inc()
        series.in_progress.inc()
        message = context.message
        due = max(message.created_at, message.not_before or 0.0)
        if due > 0:  # 0: a producer that set no created_at; no wait to tell
            series.waited.observe(max(0.0, context.started_at - due))

    def on_partial(self, context: TaskContext, seq: int, value: Any) -> None:
        series = context.state.get(self._key)
        if series is not None:
            series.partials.inc()

    def after_run(self, context: TaskContext, outcome: Outcome) -> None:
        series = context.state.pop(self._key, None)
        if series is None:
            return
        series.in_progress.dec()
        if outcome.status != "interrupted":
            series.finished[outcome.status].inc()
            series.duration.observe(outcome.duration)

    def on_dead_letter(self, letter: DeadLettered) -> None:
        key = (letter.queue, letter.reason)
        child = self._dead.get(key)
        if child is None:
            child = self._dead[key] = self.dead_letters.labels(*key)
        child.inc()

    # -- serving -------------------------------------------------------------------

    def serve(self, port: int, host: str = "127.0.0.1") -> MetricsServer:
        """Serve this registry on ``http://host:port/metrics`` from a daemon thread
        (prometheus_client's own server); port 0 takes a free one. A port that cannot be
        bound is a ``ConfigurationError`` naming it."""
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigurationError(f"cannot serve metrics on {host}:{port}: "
                                     f"{exc.strerror or exc}") from None
        bound = server.server_port
        log.info("serving metrics on http://%s:%d/metrics", _host(host), bound)
        return MetricsServer(host, bound, server.shutdown, server.server_close, thread.join)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """A running ``/metrics`` server; ``close()`` stops it."""

    host: str
    port: int
    _shutdown: Callable[[], None]
    _close: Callable[[], None]
    _join: Callable[[float], None]

    @property
    def url(self) -> str:
        return f"http://{_host(self.host)}:{self.port}/metrics"

    def close(self) -> None:
        self._shutdown()
        self._close()
        self._join(5.0)
