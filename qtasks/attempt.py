"""One attempt of one task: run it under ``max_time``, publish each yield as a partial,
then publish its final (or enqueue its retry) and settle its message.

The worker decides *whether* a delivery runs (decoding, leases, redeliveries, cancel
requests heard before the start); ``AttemptRunner`` runs it, and is the one place that
calls the middleware's run hooks and sets the task's context (``qtasks.current_task``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import Executor
from dataclasses import replace
from typing import Any

from qtasks.cancellation import Revocations
from qtasks.canvas.advance import Continuations
from qtasks.canvas.claims import Claims
from qtasks.canvas.wire import renewed
from qtasks.context import TaskContext, enter
from qtasks.errors import TaskCancelled, TaskTimeLimitExceeded
from qtasks.executors import default_executor
from qtasks.interfaces import Delivery
from qtasks.middleware import MiddlewareChain, Outcome, OutcomeStatus
from qtasks.protocol import ErrorInfo, ResultEvent, TaskMessage
from qtasks.running import AttemptReport, RunningStatus, error_info
from qtasks.runtime import Runtime
from qtasks.schema import TaskExecSchema, TaskStatus

log = logging.getLogger("qtasks.worker")

#: Seconds a generator may run without the event loop getting a turn (when it yields
#: in a tight loop): the bound on how long its partials can wait to be sent.
LOOP_TURN = 0.002


class AttemptRunner:
    """Runs attempts for one worker, and interrupts them on cancel requests."""

    def __init__(self, runtime: Runtime, report: AttemptReport, revoked: Revocations,
                 threads: Executor, running_after: float) -> None:
        self.runtime = runtime
        self.report = report
        self.revoked = revoked
        self.threads = threads
        self.running_after = running_after
        self.middleware: MiddlewareChain = runtime.middleware
        #: Tasks whose function runs now, by task id: what a cancel request interrupts.
        self._executing: dict[str, asyncio.Task[Any]] = {}
        #: Runs interrupted by a cancel request (not by the worker stopping).
        self._cancelling: set[asyncio.Task[Any]] = set()
        #: How many attempts ended so, by outcome: what the heartbeat reports.
        self.ended: Counter[str] = Counter()
        #: Workflows (``qtasks.canvas``): what follows a final, and which copy runs.
        self.continuations = Continuations(runtime)
        report.advance = self.continuations.advance
        self.claims = Claims(report)

    def cancel(self, task_id: str) -> None:
        """Interrupt ``task_id`` if it runs here (the request is already in ``revoked``)."""
        running = self._executing.get(task_id)
        if running is not None:
            log.info("cancelling task %s on request", task_id)
            self._cancelling.add(running)
            running.cancel()

    async def end_cancelled(self, delivery: Delivery, message: TaskMessage,
                            schema: TaskExecSchema) -> None:
        """A task cancelled before it started: its final says so, and it never runs."""
        log.info("task %s %s was cancelled before it started", message.task, message.id)
        self.ended["cancelled"] += 1
        base = self.report.event("final", message, time.time())
        await self.report.finish(delivery, message, base, TaskStatus.CANCELLED, None,
                                 self._cancelled(message, "before it started"),
                                 schema.result_ttl)

    def _cancelled(self, message: TaskMessage, when: str) -> ErrorInfo:
        """The final's error for a task ended by a cancel request, with its reason."""
        reason = self.revoked.reason(message.id)
        return error_info(TaskCancelled(f"task {message.task} {message.id} was cancelled "
                                        f"{when}{': ' + reason if reason else ''}"))

    async def run(self, delivery: Delivery, message: TaskMessage,
                  schema: TaskExecSchema) -> None:
        reply_to = message.headers.get("reply_to")
        started_at = time.time()
        base = self.report.event("status", message, started_at)
        running = RunningStatus(
            lambda: self.report.publish(replace(base, status=TaskStatus.RUNNING.value,
                                                ts=started_at), reply_to),
            self.running_after)
        context = TaskContext.of(message, self.report.worker, started_at)
        enter(context)
        self.middleware.before_run(context)
        outcome: OutcomeStatus = "interrupted"
        error: ErrorInfo | None = None
        partials = 0
        try:
            outcome, error, partials = await self._execute(
                delivery, message, schema, base, running, context)
        finally:
            running.cancel()
            self.ended[outcome] += 1
            self.middleware.after_run(context, Outcome(
                outcome, time.time() - started_at, partials, error))

    async def _execute(self, delivery: Delivery, message: TaskMessage, schema: TaskExecSchema,
                       base: ResultEvent, running: RunningStatus, context: TaskContext,
                       ) -> tuple[OutcomeStatus, ErrorInfo | None, int]:
        reply_to = context.headers.get("reply_to")
        middleware = self.middleware
        seq = 0
        turn_due = time.time() + LOOP_TURN
        fan_out = self.continuations.fan_out_for(message)  # None but for .each() sources

        async def publish_partial(value: Any) -> None:
            nonlocal seq, turn_due
            await running.announce()
            now = time.time()
            event = replace(base, kind="partial", seq=seq, value=value, ts=now)
            seq += 1
            await self.report.publish(event, reply_to)
            if fan_out is not None:
                await fan_out(event)  # the item's task, before the generator goes on
            middleware.on_partial(context, event.seq or 0, value)
            if now >= turn_due:
                # A generator that never awaits would hold the loop, and with it every
                # partial gathered for sending, until it ends: give the senders a turn.
                await asyncio.sleep(0)
                turn_due = now + LOOP_TURN

        executor_cls = schema.executor or self.runtime.executor or default_executor(schema)
        executor = executor_cls(schema, message.args, message.kwargs,
                                publish=publish_partial, thread_pool=self.threads)
        max_time = message.max_time if message.max_time is not None else schema.max_time
        status, returning, error = TaskStatus.SUCCESS, None, None
        failed_attempt: Exception | None = None  # to be retried
        timer = asyncio.timeout(max_time)
        current = asyncio.current_task()
        assert current is not None
        self._executing[message.id] = current
        try:
            async with timer:
                returning = await executor.execute()
        except TimeoutError as exc:
            if not timer.expired():
                status, error = TaskStatus.ERROR, error_info(exc)
            else:
                status = TaskStatus.ERROR
                error = error_info(TaskTimeLimitExceeded(
                    f"task {message.task} {message.id} exceeded max_time of {max_time} s"))
        except asyncio.CancelledError as exc:
            if current in self._cancelling and current.uncancel() == 0:
                status = TaskStatus.CANCELLED
                error = self._cancelled(message, "while running")
            elif current.cancelling():
                raise  # the worker is stopping: not the task's outcome
            else:
                status, error = TaskStatus.CANCELLED, error_info(exc)  # cancelled itself
        except Exception as exc:
            if schema.retry.should_retry(message.attempt, exc):
                failed_attempt = exc
            else:
                status, error = TaskStatus.ERROR, error_info(exc)
        finally:
            # From here on a cancel request no longer interrupts: the outcome is decided.
            if self._executing.get(message.id) is current:  # not a second run of the id
                del self._executing[message.id]
            self._cancelling.discard(current)
        await running.settle()
        if failed_attempt is not None:
            await self._retry(delivery, message, schema, base, failed_attempt, context)
            return "retry", error_info(failed_attempt), seq
        await self.report.finish(delivery, message, replace(base, partials=seq), status,
                                 returning, error, schema.result_ttl)
        return status.value, error, seq  # type: ignore[return-value]

    async def _retry(self, delivery: Delivery, message: TaskMessage, schema: TaskExecSchema,
                     base: ResultEvent, exc: Exception, context: TaskContext) -> None:
        delay = schema.retry.delay(message.attempt)
        again = replace(message, attempt=message.attempt + 1, not_before=time.time() + delay,
                        headers=renewed(message.headers))
        log.warning("task %s %s attempt %d failed (%s: %s); retrying in %.2f s",
                    message.task, message.id, message.attempt, type(exc).__name__, exc, delay)
        # The status goes first: the next attempt's "running" must not overtake it.
        await self.report.publish(replace(base, attempt=again.attempt,
                                          status=TaskStatus.NEW.value,
                                          error=error_info(exc), ts=time.time()),
                                  context.headers.get("reply_to"))
        await self.runtime.publish(again)
        await delivery.ack()
        self.middleware.on_retry(context, exc, delay)
