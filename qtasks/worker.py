"""The worker: takes task messages from the broker and decides whether each one runs.

One delivery's life: decode (or dead-letter), find the task (or dead-letter), wait out a
``not_before`` (hand it back with ``retry_later``), settle a redelivery of an attempt
that already ended, honour a cancel request heard before the start; then
``qtasks.attempt`` runs it (partials, final or retry, ack). Any fault is caught at the
level of its delivery: one task's failure never reaches another or the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from qtasks.attempt import AttemptRunner
from qtasks.cancellation import REVOKE_TTL, Revocations
from qtasks.canvas.wire import FLOW_HEADER, flow_of
from qtasks.control import WorkerPhase, WorkerState, follow_control, qtasks_version
from qtasks.errors import ConfigurationError, MessageDecodeError, NotSupportedError
from qtasks.heartbeat import DEFAULT_HEARTBEAT, Heartbeat
from qtasks.interfaces import Broker, DeadLetterReason, Delivery, ResultStore, close_iterator
from qtasks.lease import Lease, keep_leases
from qtasks.middleware import DeadLettered, WorkerInfo
from qtasks.protocol import TaskMessage, decode_task, encode
from qtasks.ratelimit import RateLimiter
from qtasks.registry import redact
from qtasks.running import RUNNING_AFTER, AttemptReport
from qtasks.runtime import Runtime
from qtasks.schema import TaskExecSchema, TaskStatus

log = logging.getLogger(__name__)


class HasRuntime(Protocol):
    """What ``Worker`` takes besides a ``Runtime``: a ``QueueTasks`` app (its runtime)."""

    @property
    def runtime(self) -> Runtime: ...


def _log_failure(task: asyncio.Task[None]) -> None:
    """A worker's helper task ended by an error: say so when it happens (cancel requests
    are no longer followed), not only at shutdown."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("%s failed; the worker goes on without it", task.get_name(), exc_info=exc)


def _where(backend: Broker | ResultStore) -> str:
    """A backend as the start-up line names it: its URL, redacted, or its class."""
    return redact(backend.url) if backend.url else type(backend).__name__


class Worker:
    """Runs tasks of ``app`` from ``queues`` with at most ``concurrency`` at once.

    ``run()`` returns after ``stop()``: it stops taking work, lets in-flight tasks finish
    for ``grace`` seconds, and gives the rest back to the broker unacked (another worker
    runs them). While it runs it heartbeats on the control channel every ``heartbeat``
    seconds (``qtasks.heartbeat``), and says goodbye once stopped.
    """

    def __init__(
        self,
        app: Runtime | HasRuntime,
        queues: list[str] | None = None,
        concurrency: int = 100,
        grace: float = 30.0,
        name: str | None = None,
        running_after: float = RUNNING_AFTER,
        revoke_ttl: float = REVOKE_TTL,
        heartbeat: float = DEFAULT_HEARTBEAT,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) \
                or concurrency < 1:
            raise ConfigurationError(f"concurrency must be an integer of 1 or more, "
                                     f"not {concurrency!r}")
        self.runtime = app if isinstance(app, Runtime) else app.runtime
        self.queues = queues or self.runtime.queues()
        self.concurrency = concurrency
        self.grace = grace
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.in_flight: dict[asyncio.Task[None], Delivery] = {}
        #: Cancel requests heard (``QueueTasks.cancel``), by task id.
        self.revoked = Revocations(revoke_ttl)
        #: Runs in progress by (task id, attempt): a delivery of one of them again joins
        #: it instead of starting a second run (``qtasks.lease``).
        self._leases: dict[tuple[str, int], Lease] = {}
        self.processed = 0
        #: Tasks this worker holds now (running, or waiting to be handed back), by queue.
        self.holding: dict[str, int] = {}
        self.report = AttemptReport(self.runtime.results_store, self.name)
        self._stop = asyncio.Event()
        self._started = asyncio.Event()
        self._threads = ThreadPoolExecutor(max_workers=concurrency,
                                           thread_name_prefix="qtasks-sync")
        self.runner = AttemptRunner(self.runtime, self.report, self.revoked, self._threads,
                                    running_after)
        #: Start slots of the rate-limited tasks (per worker process, as in Celery).
        self.limiter = RateLimiter()
        self.middleware = self.runtime.middleware
        self.info = WorkerInfo(self.name, tuple(self.queues), concurrency)
        self.started_at = 0.0
        self.heartbeat = Heartbeat(self.runtime.broker.broadcast, self.runtime.seal,
                                   self.describe, heartbeat)

    async def wait_started(self) -> None:
        await self._started.wait()

    def stop(self) -> None:
        """Begin a graceful stop; safe to call from a signal handler, more than once."""
        self._stop.set()

    async def run(self) -> None:
        runtime = self.runtime
        await runtime.start()
        await runtime.broker.declare(self.queues)
        if self.middleware:
            runtime.broker.on_dead_letter = self.middleware.broker_dead_letter
        try:
            # Subscribed before consuming: no request for a task this worker takes is missed.
            control: AsyncIterator[bytes] | None = await runtime.broker.control()
        except NotSupportedError:
            control = None
        follow = asyncio.create_task(
            follow_control(control, runtime.signer, self._cancel, self._answer_ping)
            if control is not None else asyncio.sleep(0), name="qtasks-control")
        follow.add_done_callback(_log_failure)
        consumer = asyncio.create_task(self._consume(), name="qtasks-consume")
        lease = asyncio.create_task(
            keep_leases(runtime.broker.lease_interval, self.in_flight.values),
            name="qtasks-lease")
        self.middleware.worker_start(self.info)
        self.started_at = time.time()
        beating = asyncio.create_task(
            self.heartbeat.run() if control is not None else asyncio.sleep(0),
            name="qtasks-heartbeat")
        beating.add_done_callback(_log_failure)
        self._started.set()
        # "consuming" marks readiness for scripts, tests and the benchmark harness.
        log.info("worker %s consuming %s with concurrency %d; broker %s, results %s; "
                 "tasks: %s", self.name, ",".join(self.queues), self.concurrency,
                 _where(runtime.broker), _where(runtime.results_store),
                 ", ".join(sorted(runtime.registry)) or "(none)")
        try:
            stop = asyncio.create_task(self._stop.wait())
            await asyncio.wait({consumer, stop}, return_when=asyncio.FIRST_COMPLETED)
            if consumer.done() and not consumer.cancelled() and consumer.exception():
                raise consumer.exception()  # type: ignore[misc]
        finally:
            stop.cancel()
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
            await self._drain()
            for helper in (lease, follow, beating):
                helper.cancel()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await helper  # a failure was logged when it happened
            if control is not None:
                await self.heartbeat.goodbye()  # the last word: nothing is sent after it
            self._threads.shutdown(wait=False, cancel_futures=True)
            self.middleware.worker_stop(self.info)
            log.info("worker %s stopped after %d tasks", self.name, self.processed)

    async def _drain(self) -> None:
        if not self.in_flight:
            return
        log.info("waiting up to %.1f s for %d in-flight tasks", self.grace, len(self.in_flight))
        _, pending = await asyncio.wait(set(self.in_flight), timeout=self.grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
            log.warning("%d tasks did not finish within the grace period: requeued",
                        len(pending))

    async def _consume(self) -> None:
        deliveries = self.runtime.broker.consume(self.queues, prefetch=self.concurrency)
        try:
            async for delivery in deliveries:
                task = asyncio.create_task(self._handle(delivery))
                self.in_flight[task] = delivery
                task.add_done_callback(self._done)
        finally:
            await close_iterator(deliveries)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.in_flight.pop(task, None)
        self.processed += 1

    def _cancel(self, task_id: str, reason: str) -> None:
        """A cancel request: remembered, and the task interrupted if it runs here."""
        self.revoked.add(task_id, reason)
        self.runner.cancel(task_id)

    def describe(self, phase: WorkerPhase | None = None) -> WorkerState:
        """This worker as its pings answers and heartbeats tell it (``phase`` None:
        ``alive``, or ``stopping`` once a stop has begun)."""
        ended = self.runner.ended
        return WorkerState(
            id=self.name, queues=list(self.queues), concurrency=self.concurrency,
            in_flight=dict(self.holding), processed=self.processed, ts=time.time(),
            state=phase or ("stopping" if self._stop.is_set() else "alive"),
            heartbeat=self.heartbeat.interval, started_at=self.started_at,
            done=ended["success"], failed=ended["error"], retried=ended["retry"],
            cancelled=ended["cancelled"], version=qtasks_version())

    async def _answer_ping(self) -> None:
        await self.runtime.broker.broadcast(self.runtime.seal(encode(self.describe())))

    async def _handle(self, delivery: Delivery) -> None:
        try:
            await self._process(delivery)
        except asyncio.CancelledError:
            # Stopping past the grace period: the message goes back, unacked.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._held(delivery).requeue())
        except Exception:
            log.exception("internal error while handling a delivery; giving it back")
            with contextlib.suppress(Exception):
                await self._held(delivery).requeue()

    def _held(self, delivery: Delivery) -> Delivery:
        """What this handler holds now: its run's lease once it runs, else the delivery."""
        current = asyncio.current_task()
        return self.in_flight.get(current, delivery) if current is not None else delivery

    async def _process(self, delivery: Delivery) -> None:
        runtime = self.runtime
        if runtime.signer is not None and (refused := runtime.signer.verify(delivery.body)):
            log.error("dead-lettering a task message: %s", refused)
            await delivery.dead_letter(refused)
            self._dead_lettered("unsigned" if refused.startswith("unsigned") else "forged",
                                refused)
            return
        try:
            message = decode_task(delivery.body)
            flow_of(message.headers)  # a workflow's header is checked with the rest
        except MessageDecodeError as exc:
            log.error("dead-lettering an undecodable message: %s", exc)
            await delivery.dead_letter(f"undecodable: {exc}")
            self._dead_lettered("undecodable", f"undecodable: {exc}")
            return
        schema = runtime.registry.get(message.task)
        if schema is None:
            await self.report.unknown_task(delivery, message)
            self._dead_lettered("unknown_task", f"unknown task: {message.task!r}", message)
            return
        key = (message.id, message.attempt)
        lease = self._leases.get(key)
        if lease is not None and await lease.join(delivery):
            # A workflow's continuation comes in copies by design (qtasks.canvas.claims).
            (log.info if FLOW_HEADER in message.headers else log.warning)(
                "task %s %s was delivered again while it is handled here (its lease was "
                "lost: a channel or connection closed, or it was published twice); the run "
                "goes on and settles both", message.task, message.id)
            return
        # Held from here, before any await: a copy arriving meanwhile joins this handling.
        lease = self._leases[key] = Lease(delivery)
        current = asyncio.current_task()
        if current in self.in_flight:
            self.in_flight[current] = lease  # kept alive, or given back on a stop, as one
        holding = self.holding
        holding[message.queue] = holding.get(message.queue, 0) + 1
        try:
            await self._process_held(lease, message, schema)
        finally:
            if self._leases.get(key) is lease:
                del self._leases[key]
            if holding[message.queue] == 1:
                del holding[message.queue]
            else:
                holding[message.queue] -= 1

    async def _process_held(self, lease: Lease, message: TaskMessage,
                            schema: TaskExecSchema) -> None:
        if message.not_before is not None:
            wait = message.not_before - time.time()
            if wait > 0.001:
                if self.revoked.reason(message.id) is not None:
                    # Now, not when due: by then this worker may have forgotten the request.
                    await self.runner.end_cancelled(lease, message, schema)
                else:
                    await lease.retry_later(wait)
                return
        if FLOW_HEADER in message.headers:  # a workflow's task: may come in copies
            if not await self.runner.claims.admit(lease, message, self._already_done):
                return
        elif lease.redelivered and await self._already_done(lease, message):
            return
        # A rate-limited task without a free start slot goes back to the broker until its
        # slot (``qtasks.ratelimit``): it holds no concurrency slot while it waits.
        if self.revoked.reason(message.id) is None and await self.limiter.pace(
                lease, message.task, schema.rate_limit, (message.id, message.attempt)):
            return
        # No await from this check until the task is registered as executing, so a
        # cancel request is either seen here or interrupts the run.
        if self.revoked.reason(message.id) is not None:
            await self.runner.end_cancelled(lease, message, schema)
            return
        await self.runner.run(lease, message, schema)

    def _dead_lettered(self, reason: DeadLetterReason, detail: str,
                       message: TaskMessage | None = None) -> None:
        if self.middleware:
            # An undecodable body names no queue: the first queue this worker consumes.
            queue = message.queue if message is not None else self.queues[0]
            self.middleware.on_dead_letter(DeadLettered(queue, reason, detail, message))

    async def _already_done(self, lease: Delivery, message: TaskMessage,
                            again: bool = True) -> bool:
        """A redelivered attempt that already ended (only its ack was lost) is settled
        without running again: its final is stored, or a later attempt has started.
        ``again``: the final is published again and what follows it in a workflow started
        again (False for another copy of a workflow's task, not the one that ran)."""
        previous = await self.runtime.results_store.get(message.id)
        if previous is None or previous.attempt < message.attempt:
            return False
        if previous.kind == "final":
            if previous.error is not None and previous.error.type == "UnknownTaskError":
                return False  # a dead letter requeued once its task was deployed: run it
            # The final is published again (a duplicate at worst, which readers drop): a
            # store that keeps it in two places may have been left with it in one.
            if again:
                await self.report.publish(previous, message.headers.get("reply_to"))
                await self.report.conclude(lease, message, previous)
                return True
        elif not (previous.attempt > message.attempt
                  and previous.status == TaskStatus.RUNNING.value):
            # A later attempt that has not started yet: its message may not have been
            # published (the worker died between its "new" status and the publish).
            return False
        await lease.ack()
        return True
