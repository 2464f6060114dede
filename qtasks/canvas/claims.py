"""Running a workflow's task once although its message may be published more than once.

A continuation is published by whichever worker finishes the step before it, and again by
any redelivery of that step, and a join's continuation by every member that finds the
group complete: copies of one task id, each with its own claim token in the flow header
(JetStream drops copies within its duplicate window; elsewhere they all arrive).

A worker that receives such a copy first reads the task's latest event: a final means the
task is done (the copy is acked; only a redelivery of the copy that ran it, which may
have died before starting what follows, does that again). Otherwise it **claims** the
attempt: it appends a ``running`` status whose ``claim`` is ``<token>:<nonce>`` to the
task's result log, then reads the log from the start up to that event. The first claim of
the attempt in the log wins; the log is one totally ordered stream on every backend, so
every copy reads the same first claim and exactly one runs. The others are acked unrun; if
the winner's worker dies, the winner's own copy comes back, with the same token, and wins
again. A final read before one's own claim means the task ended meanwhile: one's claim,
now its latest event, hides that final from ``get``, so the final is published again and
what follows it checked (a join a sibling could not complete while it was hidden).
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
        if await already_done(delivery, message, delivery.redelivered):
            return False
        try:
            async with asyncio.timeout(CLAIM_TIMEOUT):
                return await self._claim(delivery, message, flow.claim)
        except TimeoutError:
            log.warning("task %s %s: its claim was not read back within %g s; handed back "
                        "to try again", message.task, message.id, CLAIM_TIMEOUT)
            await delivery.retry_later(CLAIM_RETRY)
            return False

    async def _claim(self, delivery: Delivery, message: TaskMessage, token: str) -> bool:
        mine = f"{token}:{new_claim()}"
        now = time.time()
        claim = replace(self.report.event("status", message, now),
                        status=TaskStatus.RUNNING.value, ts=now, claim=mine)
        await self.report.publish(claim, None)
        first: str | None = None
        later = False
        final: ResultEvent | None = None
        events = self.store.watch(message.id)
        try:
            async for event in events:
                if event.kind == "final":
                    final = event if event.attempt >= message.attempt else None
                    break
                if event.kind != "status":
                    continue
                if event.attempt > message.attempt \
                        and event.status == TaskStatus.RUNNING.value:
                    later = True  # a retry of this task runs: this copy is stale
                elif event.attempt == message.attempt and event.claim:
                    first = first or event.claim.partition(":")[0]
                    if event.claim == mine:
                        break
        finally:
            await close_iterator(events)
        if final is not None:
            log.info("task %s %s ended while a copy of it was claimed: copy settled",
                     message.task, message.id)
            await self.report.publish(final, None)  # the claim above now hides it
            await self.report.conclude(delivery, message, final)
            return False
        if later or first != token:
            log.info("task %s %s attempt %d: another copy of it %s; copy settled unrun",
                     message.task, message.id, message.attempt,
                     "was retried" if later else "runs")
            await delivery.ack()
            return False
        return True
