"""Running a workflow's task once although its message may be published more than once.

A continuation is published by whichever worker finishes the step before it, and again by
any redelivery of that step, and a join's continuation by every member that finds the
group complete: copies of one task id, each with its own claim token in the flow header
(JetStream drops copies within its duplicate window; elsewhere they all arrive).

A worker that receives such a copy **claims** the attempt: it appends a ``running``
status whose ``claim`` is ``<token>:<nonce>`` to the task's result log, then reads the log
from the start up to that event. The first claim of the attempt in the log wins; the log
is one totally ordered stream on every backend, so every copy reads the same first claim
and exactly one runs. The others are acked unrun; if the winner's worker dies, the
winner's own copy comes back, with the same token, and wins again.

A final read before one's own claim means the task had ended: the copy is acked unrun.
Its claim, now the task's latest event, hid that final from ``get`` for a moment, so the
final is published again, and for a join's member the join is checked again (a sibling
that read it while hidden found the group incomplete). A redelivered copy first does what
any redelivered task does (``Worker._already_done``): with a final stored, it publishes
it again and starts what follows (its worker may have died before doing so).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from qtasks.canvas.wire import FLOW_HEADER, Flow, new_claim
from qtasks.interfaces import Delivery, close_iterator
from qtasks.protocol import ResultEvent, TaskMessage
from qtasks.schema import TaskStatus

if TYPE_CHECKING:
    from qtasks.running import AttemptReport

log = logging.getLogger(__name__)

#: How long a claim waits to read itself back; past it, the copy is handed back to try
#: again later (``CLAIM_RETRY`` seconds), as a task whose result store is unreachable.
CLAIM_TIMEOUT = 60.0
CLAIM_RETRY = 1.0

#: ``Worker._already_done``: settles a copy whose task already ended (True), republishing
#: the final and starting what follows it when ``again`` (a redelivery).
AlreadyDone = Callable[[Delivery, TaskMessage, bool], Awaitable[bool]]


class Claims:
    """Decides, for each delivered copy of a workflow's task, whether it runs."""

    def __init__(self, report: AttemptReport) -> None:
        self.report = report
        self.store = report.results_store

    async def admit(self, delivery: Delivery, message: TaskMessage,
                    already_done: AlreadyDone) -> bool:
        """True: run this copy. False: it was settled here (done, or another copy runs)."""
        flow = Flow.from_header(message.headers[FLOW_HEADER])  # checked when decoded
        if flow.claim is None:  # the producer's: published once, as any task
            return not (delivery.redelivered and await already_done(delivery, message, True))
        if delivery.redelivered and await already_done(delivery, message, True):
            return False  # this copy ran (or another did) and may not have gone on
        try:
            async with asyncio.timeout(CLAIM_TIMEOUT):
                return await self._claim(delivery, message, flow)
        except TimeoutError:
            log.warning("task %s %s: its claim was not read back within %g s; handed back "
                        "to try again", message.task, message.id, CLAIM_TIMEOUT)
            await delivery.retry_later(CLAIM_RETRY)
            return False

    async def _claim(self, delivery: Delivery, message: TaskMessage, flow: Flow) -> bool:
        token = flow.claim
        mine = f"{token}:{new_claim()}"
        now = time.time()
        claim = replace(self.report.event("status", message, now),
                        status=TaskStatus.RUNNING.value, ts=now, claim=mine)
        await self.report.publish(claim, None)
        reading = _Reading(message.attempt, mine)
        history = await self.store.history(message.id)
        if history is None or not any(reading.take(event) for event in history):
            reading = _Reading(message.attempt, mine)  # from the first event again
            events = self.store.watch(message.id)
            try:
                async for event in events:
                    if reading.take(event):
                        break
            finally:
                await close_iterator(events)
        final, first, later = reading.final, reading.first, reading.later
        if final is not None:
            log.info("task %s %s had ended when a copy of it came: copy settled unrun",
                     message.task, message.id)
            await self.report.publish(final, None)  # the claim above hid it from ``get``
            if flow.member is not None or flow.item is not None or flow.each is not None:
                # A join member: a sibling that read it while hidden may have missed the
                # group's completion; its check is made again here.
                await self.report.conclude(delivery, message, final)
            else:
                await delivery.ack()
            return False
        if later or first != token:
            log.info("task %s %s attempt %d: another copy of it %s; copy settled unrun",
                     message.task, message.id, message.attempt,
                     "was retried" if later else "runs")
            await delivery.ack()
            return False
        return True


class _Reading:
    """A task's log read up to one's own claim: its final (if it came first), whether a
    later attempt runs, and whose claim of this attempt came first."""

    def __init__(self, attempt: int, mine: str) -> None:
        self.attempt, self.mine = attempt, mine
        self.final: ResultEvent | None = None
        self.first: str | None = None
        self.later = False

    def take(self, event: ResultEvent) -> bool:
        """Note ``event``; True once the reading is complete."""
        if event.kind == "final":
            self.final = event if event.attempt >= self.attempt else None
            return True
        if event.kind != "status":
            return False
        if event.attempt > self.attempt and event.status == TaskStatus.RUNNING.value:
            self.later = True  # a retry of this task runs: this copy is stale
        elif event.attempt == self.attempt and event.claim:
            self.first = self.first or event.claim.partition(":")[0]
            return event.claim == self.mine
        return False
