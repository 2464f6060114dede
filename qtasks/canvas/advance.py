"""The worker's side of a workflow: what it starts after a task of one succeeded.

``Continuations.advance`` runs between a final being durable and its message being acked
(``AttemptReport.conclude``), and again when a redelivered message finds its final
stored, so a worker killed in between loses nothing. What follows a task:

- the next step, with its ``returning`` first among the arguments;
- for a group member, a fan-out item or a generator with an ``each`` step: the *join*.
  It reads the finals of the others from the result store; when all succeeded, it starts
  the next step with their results in order. No polling: each of them checks once, after
  its own final, so whoever finishes last sees them all.

``fan_out_for`` gives a generator with an ``each`` step the publisher of its items, called
from the partial path for every yielded value. Every id is derived (``wire.derive_id``),
so whatever is started twice is the same task twice, which ``qtasks.canvas.claims``
runs once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from qtasks.canvas.launch import step_message, unit_messages
from qtasks.canvas.wire import (
    FLOW_HEADER,
    Flow,
    derive_id,
    id_ms,
    ms_of,
    new_claim,
    step_path,
)
from qtasks.errors import MessageEncodeError, MessageTooLargeError
from qtasks.protocol import ResultEvent, TaskMessage, encode
from qtasks.running import error_info

if TYPE_CHECKING:
    from qtasks.runtime import Runtime

log = logging.getLogger(__name__)

SUCCESS = "success"


def _succeeded(event: ResultEvent | None) -> bool:
    return event is not None and event.kind == "final" and event.status == SUCCESS


class Continuations:
    """Starts the continuations of one worker's workflow tasks."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.store = runtime.results_store

    async def advance(self, message: TaskMessage, final: ResultEvent) -> None:
        """After ``final`` of ``message`` is durable: start what follows, if it is due."""
        header = message.headers.get(FLOW_HEADER)
        if header is None or final.status != SUCCESS:
            return  # not a workflow's task, or the workflow stops here
        flow = Flow.from_header(header)
        if not flow.rest:
            return  # the last step: its handle gathers the results, nobody else needs them
        if flow.member is not None:
            joined = await self._group(flow, final)
        elif flow.item is not None or flow.each is not None:
            joined = await self._fan_out(flow, message.id, final)
        else:
            joined = final.returning, ms_of(final.created_at, flow.ms)
        if joined is not None:
            await self.start(flow, *joined)

    async def start(self, flow: Flow, value: Any, ms: int) -> None:
        """Publish the unit after ``flow``'s, with ``value`` as its first argument."""
        messages = unit_messages(flow.workflow, flow.next_step, flow.rest, (value,), ms,
                                 claim=True, default_queue=self.runtime.default_queue)
        await asyncio.gather(*(self._publish(m) for m in messages))
        log.debug("workflow %s: started step %d (%s)", flow.workflow, flow.next_step,
                  ", ".join(m.id for m in messages))

    async def _publish(self, message: TaskMessage) -> None:
        """Publish a continuation; one that can never be published (a value too large
        for a task message, or not JSON) ends as an ``error`` final of its own id, which
        the workflow's handle reports, rather than be retried for ever. A broker that is
        down raises: the step's message goes back, and its redelivery tries again."""
        try:
            await self.runtime.publish(message)
        except (MessageEncodeError, MessageTooLargeError) as exc:
            log.error("workflow task %s %s cannot be started: %s", message.task, message.id,
                      exc)
            now = time.time()
            final = ResultEvent(kind="final", id=message.id, task=message.task,
                                status="error", error=error_info(exc), ts=now,
                                finished_at=now, created_at=message.created_at)
            await self.store.publish(final, encode(final))

    async def _group(self, flow: Flow, final: ResultEvent) -> tuple[list[Any], int] | None:
        """The group's results once every member succeeded; None while one has not."""
        assert flow.member is not None
        index, size = flow.member
        others = [(index + k) % size for k in range(1, size)]
        finals = await self._finals([derive_id(flow.workflow, step_path(flow.step, other),
                                               flow.ms) for other in others])
        if finals is None:
            return None
        by_index = {index: final, **dict(zip(others, finals, strict=True))}
        ordered = [by_index[i] for i in range(size)]
        return ([f.returning for f in ordered],
                max(ms_of(f.created_at, flow.ms) for f in ordered))

    async def _finals(self, ids: list[str],
                      known: dict[str, ResultEvent] | None = None) -> list[ResultEvent] | None:
        """The finals of ``ids``, in order, if every one succeeded, else None. The first
        is read alone (unless ``known`` has it): the siblings are listed from the one
        after the caller, which for an early finisher likely still runs, so that most
        checks stop after one read; the rest are read at once (``ResultStore.get_many``,
        one pass of the log)."""
        if not ids:
            return []
        first = (known or {}).get(ids[0]) or await self.store.get(ids[0])
        if not _succeeded(first):
            return None
        assert first is not None
        found = await self.store.get_many(ids[1:]) if len(ids) > 1 else {}
        rest = [found.get(task_id) for task_id in ids[1:]]
        if not all(_succeeded(event) for event in rest):
            return None
        return [first, *(event for event in rest if event is not None)]

    async def _fan_out(self, flow: Flow, task_id: str,
                       final: ResultEvent) -> tuple[list[Any], int] | None:
        """The items' results, in yield order, once the generator succeeded and every
        item its last attempt started did; None while one has not. Called by the
        generator (``flow.each``) and by each item (``flow.item``)."""
        known: dict[str, ResultEvent] = {}
        if flow.item is not None:
            assert flow.gen is not None
            attempt, mine = flow.item
            gen_id, index = flow.gen, flow.step
            item_ms = id_ms(gen_id)

            def item_id(seq: int) -> str:
                return derive_id(flow.workflow, step_path(index, attempt, seq), item_ms)

            # The generator and the item after this one (the next, or the first) at once.
            known = await self.store.get_many([gen_id, item_id(mine + 1), item_id(0)])
            gen = known.get(gen_id)
            if not _succeeded(gen) or gen is None or gen.attempt != attempt:
                return None  # the generator still runs (it joins when it ends) or failed
        else:
            gen, gen_id, index, mine = final, task_id, flow.step + 1, -1
        count, item_ms = gen.partials, id_ms(gen_id)
        seqs = [(mine + k) % count for k in range(1, count + 1) if (mine + k) % count != mine]
        finals = await self._finals([derive_id(flow.workflow,
                                               step_path(index, gen.attempt, seq), item_ms)
                                     for seq in seqs], known)
        if finals is None:
            return None
        by_seq = dict(zip(seqs, finals, strict=True))
        if mine >= 0:
            by_seq[mine] = final
        ordered = [by_seq[seq] for seq in range(count)]
        last = max([ms_of(gen.created_at, flow.ms)]
                   + [ms_of(f.created_at, flow.ms) for f in ordered])
        return [f.returning for f in ordered], last

    def fan_out_for(self, message: TaskMessage) -> Callable[[ResultEvent], Awaitable[None]] \
            | None:
        """For a generator followed by ``.each()``: what publishes the item of each of
        its partials (its id keyed by the partial's ``(attempt, seq)``), awaited before
        the generator goes on. None for any other task (the plain path pays nothing)."""
        header = message.headers.get(FLOW_HEADER)
        if header is None:
            return None
        flow = Flow.from_header(header)
        each = flow.each
        if each is None:
            return None
        index, item_ms = flow.step + 1, id_ms(message.id)

        async def publish_item(event: ResultEvent) -> None:
            item = Flow(flow.workflow, index, item_ms, flow.rest,
                        item=(event.attempt, event.seq), gen=message.id, claim=new_claim())
            task_id = derive_id(flow.workflow, step_path(index, event.attempt, event.seq),
                                item_ms)
            await self.runtime.publish(step_message(
                each, task_id, (event.value,), item, time.time(), self.runtime.default_queue))

        return publish_item
