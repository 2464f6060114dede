"""The periodic scheduler (``qtasks beat``, ``qtasks worker --beat``): enqueues each tick
of an app's schedules once, however many schedulers run.

Several beat processes may run for availability. They elect one leader per ``group``
through the broker (``Broker.lead``: a single-active-consumer lock queue on RabbitMQ, a
KV lock on NATS); only the leader enqueues. Each batch of ticks is committed with the
record of the last tick enqueued per schedule (``Leadership.commit``), so a leader taking
over goes on from where the last one stopped: ticks due in between (at most ``grace``
seconds old) are enqueued late, once each; older ones follow the schedule's ``missed``
policy (``qtasks.periodic``). A tick's task id derives from the schedule and the tick, so
a copy of a tick is the same task (JetStream drops it; on RabbitMQ the commit is one
transaction, so none is made). See ``docs/periodic.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from qtasks.errors import ConfigurationError, LeadershipLost
from qtasks.interfaces import Leadership
from qtasks.periodic import SCHEDULE_HEADER, TICK_HEADER, Schedule, tick_id
from qtasks.protocol import TaskMessage, encode
from qtasks.runtime import Runtime

log = logging.getLogger(__name__)

#: Bounds of the default lock TTL (half the shortest gap between two ticks).
MIN_TTL, MAX_TTL = 0.25, 10.0
#: Seconds between attempts when a commit fails for another reason than a lost lead.
RETRY = 1.0


class HasSchedules(Protocol):
    """What ``Beat`` takes: a ``QueueTasks`` app (its runtime and its schedules)."""

    @property
    def runtime(self) -> Runtime: ...

    @property
    def schedules(self) -> Mapping[str, Schedule]: ...


def default_ttl(schedules: Sequence[Schedule], now: float) -> float:
    """Half the shortest gap between two ticks, within ``MIN_TTL``..``MAX_TTL``: a beat
    that dies is replaced within two intervals of the most frequent schedule."""
    shortest = min(s.shortest_gap(now) for s in schedules)
    return min(MAX_TTL, max(MIN_TTL, shortest / 2))


class Beat:
    """Runs an app's schedules; ``run()`` returns after ``stop()``."""

    def __init__(self, app: HasSchedules, *, group: str = "default", ttl: float | None = None,
                 grace: float | None = None, clock: Callable[[], float] = time.time,
                 name: str | None = None) -> None:
        self.runtime = app.runtime
        self.schedules = list(app.schedules.values())
        if not self.schedules:
            raise ConfigurationError("the app declares no periodic task (app.periodic(...))")
        if not isinstance(group, str) or not group:
            raise ConfigurationError(f"a beat group must be a non-empty string, not {group!r}")
        self.group = group
        self.clock = clock
        self.ttl = ttl if ttl is not None else default_ttl(self.schedules, clock())
        if not self.ttl > 0:
            raise ConfigurationError(f"the lock TTL must be positive, not {self.ttl!r}")
        #: Ticks up to this old are enqueued late after a takeover; older ones are missed.
        self.grace = grace if grace is not None else 2 * self.ttl + 1.0
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        #: Set while this process leads its group.
        self.leading = asyncio.Event()
        #: Ticks this process enqueued (for logs and tests).
        self.enqueued = 0
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Stop; safe from a signal handler, more than once. The lead is handed over."""
        self._stop.set()

    async def run(self) -> None:
        await self.runtime.start()
        log.info("beat %s: %d schedules (%s), group %r, standing by for the lead",
                 self.name, len(self.schedules), ", ".join(s.name for s in self.schedules),
                 self.group)
        while not self._stop.is_set():
            turn = await self._until_stopped(self.runtime.broker.lead(self.group, self.ttl))
            if turn is None:
                break
            self.leading.set()
            log.info("beat %s leads group %r", self.name, self.group)
            try:
                await self._lead(turn)
            except LeadershipLost as exc:
                log.warning("beat %s lost the lead of group %r (%s); standing by", self.name,
                            self.group, exc)
            finally:
                self.leading.clear()
                with contextlib.suppress(Exception):
                    await turn.resign()
        log.info("beat %s stopped after %d ticks", self.name, self.enqueued)

    async def _until_stopped(self, work: Awaitable[Leadership]) -> Leadership | None:
        """``work`` unless ``stop()`` comes first."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return None

    async def _lead(self, turn: Leadership) -> None:
        recorded = dict(turn.state)
        now = self.clock()
        # A schedule nothing was recorded for starts from now: no tick from before.
        cursors = {s.name: recorded.get(s.name, now) for s in self.schedules}
        while not self._stop.is_set():
            if turn.lost.is_set():
                raise LeadershipLost("the broker ended the turn")
            now = self.clock()
            batch: list[tuple[Schedule, float]] = []
            moved: dict[str, float] = {}
            for schedule in self.schedules:
                ticks, moved[schedule.name] = schedule.due(cursors[schedule.name], now,
                                                           self.grace)
                batch += [(schedule, tick) for tick in ticks]
            if batch:
                state = dict(recorded)
                for schedule, tick in batch:
                    state[schedule.name] = max(tick, state.get(schedule.name, tick))
                messages = [self._message(s, tick, now) for s, tick in batch]
                try:
                    await turn.commit(messages, state)
                except LeadershipLost:
                    raise
                except Exception as exc:
                    log.error("beat %s could not enqueue %d ticks (%s: %s); trying again",
                              self.name, len(batch), type(exc).__name__, exc)
                    await self._sleep(turn, RETRY)
                    continue
                recorded = state
                cursors.update(moved)
                if self.runtime.middleware:
                    for message, _ in messages:
                        self.runtime.middleware.after_publish(message)
                for schedule, tick in batch:
                    log.info("tick %s at %s: %s enqueued as %s", schedule.name,
                             _iso(tick), schedule.task, tick_id(schedule.name, tick))
                self.enqueued += len(batch)
            else:
                cursors.update(moved)  # past the ticks skipped, if any
            wake = min(s.next_after(cursors[s.name]) for s in self.schedules)
            await self._sleep(turn, wake - self.clock())

    async def _sleep(self, turn: Leadership, seconds: float) -> None:
        """Until ``seconds`` have passed, the turn is lost, or ``stop()``."""
        if seconds <= 0:
            await asyncio.sleep(0)  # never a loop without a turn for the others
            return
        waits = [asyncio.ensure_future(turn.lost.wait()),
                 asyncio.ensure_future(self._stop.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    def _message(self, schedule: Schedule, tick: float, now: float) -> tuple[TaskMessage, bytes]:
        """The tick's task message and its body (sealed, within the size limit)."""
        runtime = self.runtime
        definition = runtime.registry.get(schedule.task)
        message = TaskMessage(
            id=tick_id(schedule.name, tick), task=schedule.task, args=list(schedule.args),
            kwargs=dict(schedule.kwargs),
            queue=schedule.queue or (definition.queue if definition else runtime.default_queue),
            priority=schedule.priority if schedule.priority is not None
            else (definition.priority if definition else 0),
            created_at=now, max_time=schedule.max_time if schedule.max_time is not None
            else (definition.max_time if definition else None),
            headers={**schedule.headers, SCHEDULE_HEADER: schedule.name,
                     TICK_HEADER: repr(tick)})
        if runtime.middleware:
            runtime.middleware.before_publish(message)
        limit = runtime.max_message_size
        if runtime.broker.max_message_size is not None:
            limit = min(limit, runtime.broker.max_message_size)
        return message, runtime.seal(encode(message, max_size=limit))


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"
