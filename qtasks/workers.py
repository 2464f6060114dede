"""The live workers, kept from what they say on the control channel: ``app.workers()``,
``app.watch_workers()`` and ``qtasks workers``.

Each worker says ``online`` when it starts consuming, heartbeats every few seconds and says
``offline`` when it stops (``qtasks.heartbeat``); it also answers pings at once. A
listener keeps the latest state of each worker, removes one at once on its goodbye, and
drops one that missed ``MISSED_BEATS`` heartbeats by the interval that worker announced:
a worker killed with ``kill -9`` is gone within three heartbeats. The deadline is kept on
the listener's own clock from when each message arrived, so clocks that differ between
hosts do not matter. With a signing key, a message that is not signed with it is ignored,
as workers ignore unsigned cancel requests: a stranger cannot add or remove workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from qtasks.control import ControlMessage, WorkerPhase, WorkerState, decode_control
from qtasks.errors import MessageDecodeError
from qtasks.heartbeat import DEFAULT_HEARTBEAT
from qtasks.interfaces import close_iterator
from qtasks.protocol import encode, uuid7
from qtasks.runtime import Runtime

log = logging.getLogger(__name__)

#: A worker that sent nothing for this many of its heartbeat intervals is dropped.
MISSED_BEATS = 3
#: How long a one-shot ``workers()`` listens after its ping: every connected worker
#: answers at once, so this is a round trip with room for a busy worker's loop.
PING_WAIT = 0.5

WorkerEventKind = Literal["joined", "updated", "left", "lost"]


@dataclass(frozen=True, slots=True)
class LiveWorker:
    """One live worker as its latest message described it.

    ``in_flight`` is the total of ``in_flight_by_queue``; ``done``, ``failed``,
    ``retried`` and ``cancelled`` count the attempts that ended so since it started;
    ``processed`` the deliveries it handled. ``last_seen`` is when that message arrived
    here (this host's clock); ``started_at`` is the worker's clock (None: not said)."""

    name: str
    host: str
    pid: int
    queues: tuple[str, ...]
    concurrency: int
    in_flight: int
    in_flight_by_queue: dict[str, int] = field(hash=False)
    processed: int
    done: int
    failed: int
    retried: int
    cancelled: int
    started_at: float | None
    #: The worker's uptime when it sent that message (None: it did not say).
    reported_uptime: float | None
    last_seen: float
    #: Seconds between its heartbeats (0: it sends none; it answered a ping).
    heartbeat: float
    #: ``online``, ``alive``, ``stopping`` (a graceful stop has begun), or in a ``left``
    #: change ``offline``.
    state: WorkerPhase
    version: str

    @classmethod
    def of(cls, state: WorkerState, seen: float) -> LiveWorker:
        started = state.started_at or None
        return cls(
            name=state.id, host=state.host, pid=state.pid, queues=tuple(state.queues),
            concurrency=state.concurrency, in_flight=sum(state.in_flight.values()),
            in_flight_by_queue=dict(state.in_flight), processed=state.processed,
            done=state.done, failed=state.failed, retried=state.retried,
            cancelled=state.cancelled, started_at=started,
            reported_uptime=max(0.0, state.ts - started) if started and state.ts else None,
            last_seen=seen, heartbeat=state.heartbeat,
            state=state.state,
            version=state.version)

    def uptime(self, now: float | None = None) -> float | None:
        """Seconds since it started, as of ``now`` (default: now): its own figure when
        it last spoke plus the time since, so no two hosts' clocks are compared."""
        if self.reported_uptime is None:
            return None
        return self.reported_uptime + max(0.0, (now or time.time()) - self.last_seen)

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        """The shape of ``qtasks workers --json`` (docs/cli.md)."""
        return {"name": self.name, "host": self.host, "pid": self.pid,
                "queues": list(self.queues), "concurrency": self.concurrency,
                "in_flight": self.in_flight, "in_flight_by_queue": self.in_flight_by_queue,
                "processed": self.processed, "done": self.done, "failed": self.failed,
                "retried": self.retried, "cancelled": self.cancelled,
                "started_at": self.started_at, "uptime": self.uptime(now),
                "last_seen": self.last_seen, "heartbeat": self.heartbeat,
                "state": self.state, "version": self.version}


@dataclass(frozen=True, slots=True)
class WorkersChange:
    """One change of the live set: a worker ``joined`` (announced itself, or was first
    heard of), was ``updated`` (a heartbeat or a ping answer), ``left`` (said goodbye) or
    was ``lost`` (missed three heartbeats); ``workers`` is the live set after it, by name."""

    event: WorkerEventKind
    worker: LiveWorker
    workers: tuple[LiveWorker, ...]


class LiveSet:
    """The live workers by name, fed control-channel bodies and the time; no I/O, so that
    it can be driven by any loop (``watch_workers``) or by a test's own clock.

    ``now`` is a monotonic clock (the loop's), for the deadlines; ``last_seen`` is read
    from ``time.time()``."""

    def __init__(self, runtime: Runtime, missed: int = MISSED_BEATS) -> None:
        self.signer = runtime.signer
        self.missed = missed
        self._live: dict[str, tuple[LiveWorker, float]] = {}

    @property
    def workers(self) -> tuple[LiveWorker, ...]:
        return tuple(self._live[name][0] for name in sorted(self._live))

    def next_deadline(self) -> float | None:
        """When the next worker is due to be dropped, if none speaks before."""
        return min((deadline for _, deadline in self._live.values()), default=None)

    def receive(self, body: bytes, now: float) -> WorkersChange | None:
        """Take one control-channel body; the change it makes, if any (cancel requests,
        pings, undecodable and, with a key, unsigned messages make none)."""
        try:
            state = decode_control(body)
        except MessageDecodeError as exc:
            log.debug("ignoring an undecodable control message: %s", exc)
            return None
        if not isinstance(state, WorkerState):
            return None
        if self.signer is not None and (refused := self.signer.verify(body)):
            log.debug("ignoring the state of worker %s: %s", state.id, refused)
            return None
        known = self._live.get(state.id)
        worker = LiveWorker.of(state, time.time())
        if state.state == "offline":
            if known is None:
                return None
            del self._live[state.id]
            return WorkersChange("left", worker, self.workers)
        interval = state.heartbeat or DEFAULT_HEARTBEAT  # a ping answer without beats
        self._live[state.id] = (worker, now + self.missed * interval)
        return WorkersChange("updated" if known else "joined", worker, self.workers)

    def expire(self, now: float) -> list[WorkersChange]:
        """Drop every worker whose deadline has passed: the changes, oldest first."""
        lost = sorted((deadline, name) for name, (_, deadline) in self._live.items()
                      if deadline <= now)
        changes = []
        for _, name in lost:
            worker, _ = self._live.pop(name)
            changes.append(WorkersChange("lost", worker, self.workers))
        return changes


async def ping(runtime: Runtime) -> None:
    """Ask every worker connected now to describe itself at once."""
    request = ControlMessage(id=uuid7(), kind="ping", ts=time.time())
    await runtime.broker.broadcast(runtime.seal(encode(request)))


async def live_workers(runtime: Runtime, wait: float = PING_WAIT) -> list[LiveWorker]:
    """The workers connected now: subscribed, then a ping, then every state heard within
    ``wait`` seconds (answers and heartbeats alike; one that says goodbye meanwhile is
    left out). Raises ``NotSupportedError`` for a broker without a control channel."""
    await runtime.start()
    live = LiveSet(runtime)
    control = await runtime.broker.control()
    loop = asyncio.get_running_loop()
    try:
        await ping(runtime)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                async for body in control:
                    live.receive(body, loop.time())
    finally:
        await close_iterator(control)
    return list(live.workers)


async def watch_workers(runtime: Runtime, ping_first: bool = True,
                        missed: int = MISSED_BEATS) -> AsyncIterator[WorkersChange]:
    """Every change of the live set, as it happens, until the iterator is closed.

    Subscribed before anything else; then (``ping_first``) a ping, so that the workers
    already running show up at once as ``joined`` instead of at their next heartbeat.
    Raises ``NotSupportedError`` for a broker without a control channel."""
    await runtime.start()
    live = LiveSet(runtime, missed)
    control = await runtime.broker.control()
    inbox: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
    pump = asyncio.create_task(_pump(control, inbox), name="qtasks-watch-workers")
    await asyncio.sleep(0)  # the pump has entered the subscription: closing it ends it
    loop = asyncio.get_running_loop()
    try:
        if ping_first:
            await ping(runtime)
        while True:
            item: bytes | BaseException | None = b""
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(live.next_deadline()):
                    item = await inbox.get()
            if item is None:
                return  # the subscription ended
            if isinstance(item, BaseException):
                raise item
            if item and (change := live.receive(item, loop.time())) is not None:
                yield change
            for change in live.expire(loop.time()):
                yield change
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump


async def _pump(control: AsyncIterator[bytes],
                inbox: asyncio.Queue[bytes | BaseException | None]) -> None:
    """The subscription into ``inbox``, so that waiting for the next body can time out
    without ending the subscription; its end (None) or its error follows the bodies."""
    try:
        async for body in control:
            inbox.put_nowait(body)
        inbox.put_nowait(None)
    except Exception as exc:
        inbox.put_nowait(exc)
    finally:
        await close_iterator(control)
