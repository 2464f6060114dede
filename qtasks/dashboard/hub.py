"""The dashboard's one subscription to every task's events, fanned out to its browsers.

However many browsers are open, a dashboard process holds one ``listen('*')``: the hub
reads it as fast as the result store delivers (it never waits for a browser), keeps the
last events, a summary of recent tasks and per-second counts for the chart, and offers
each event to every attached browser's bounded queue. A browser that reads slower than
events come loses events, counted and shown to it as a gap, never slowing anyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import orjson

from qtasks.interfaces import close_iterator
from qtasks.protocol import ResultEvent

log = logging.getLogger(__name__)

#: One event as pushed to the feed is at most this many bytes of JSON: past it, its big
#: fields (a partial's value, a final's returning, the arguments, a traceback) are
#: replaced by their size. The task's own page reads the event whole.
FEED_MAX = 16_384
#: How long the feed gathers events before writing them to a browser: at most 20 writes
#: a second, a delay no eye sees. A task's own page is not delayed.
FEED_LINGER = 0.05
#: Fields a feed event may lose when it is over ``FEED_MAX``, largest first in practice.
_BULKY = ("returning", "value", "args", "kwargs")


def dumps(value: Any) -> bytes:
    """JSON for the browser: anything orjson cannot encode is shown as its ``str``."""
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)


def feed_entry(event: ResultEvent) -> bytes:
    """One event as the feed shows it, within ``FEED_MAX`` bytes."""
    data = event.to_dict()
    body = dumps(data)
    if len(body) <= FEED_MAX:
        return body
    for name in _BULKY:
        if name in data:
            data[name] = {"elided": len(dumps(data[name]))}
    if data.get("error"):
        data["error"] = {**data["error"], "traceback": ""}
    return dumps(data)


class Client:
    """One browser's pushes, at most ``size`` waiting: past that, new ones are dropped
    and counted, and the browser is told how many it missed before the next one."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(size)
        self.dropped = 0

    def offer(self, kind: str, data: bytes) -> None:
        try:
            self.queue.put_nowait((kind, data))
        except asyncio.QueueFull:
            self.dropped += 1

    async def next(self) -> tuple[str, bytes]:
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            return "gap", dumps({"dropped": dropped})
        return await self.queue.get()

    async def batch(self, linger: float = 0.0, most: int = 256) -> list[tuple[str, bytes]]:
        """The next push and those that came within ``linger`` seconds after it (up to
        ``most``): written to the browser in one go. At hundreds of events a second, one
        write per batch instead of one per event is most of the dashboard's work saved."""
        pushes = [await self.next()]
        if linger > 0:
            await asyncio.sleep(linger)  # a pace, not a synchronisation: gather the burst
        while len(pushes) < most and not self.queue.empty() and not self.dropped:
            pushes.append(self.queue.get_nowait())
        return pushes


class Rates:
    """Finished tasks and failures per second over the last ``span`` seconds (for the
    overview's chart): a final is a finished task; a final ``error`` or an attempt
    scheduled again after an error is a failure."""

    def __init__(self, span: int = 600) -> None:
        self.span = span
        self.seconds: deque[list[int]] = deque()  # [second, finished, failed]

    def add(self, event: ResultEvent, now: float) -> None:
        finished = event.kind == "final"
        failed = (finished and event.status == "error") or \
            (event.kind == "status" and event.status == "new" and event.error is not None)
        if not (finished or failed):
            return
        second = int(now)
        if not self.seconds or self.seconds[-1][0] != second:
            self.seconds.append([second, 0, 0])
            while self.seconds[0][0] <= second - self.span:
                self.seconds.popleft()
        self.seconds[-1][1] += finished
        self.seconds[-1][2] += failed

    def series(self, now: float, step: int = 5, span: int = 300) -> dict[str, Any]:
        """Per-second rates in ``step``-second buckets over the last ``span`` seconds,
        oldest first, the bucket under way last."""
        end = int(now) // step * step + step
        count = span // step
        finished, failed = [0.0] * count, [0.0] * count
        for second, done, bad in self.seconds:
            index = count - 1 - (end - 1 - second) // step
            if 0 <= index < count:
                finished[index] += done / step
                failed[index] += bad / step
        return {"step": step, "end": end, "finished": finished, "failed": failed}


class EventHub:
    """The one subscription (``listen()``, such as ``app.subscribe('*')``), what it
    remembers, and the browsers it feeds."""

    def __init__(self, listen: Callable[[], Awaitable[AsyncIterator[ResultEvent]]], *,
                 history: int = 200, tasks: int = 500, client_buffer: int = 1000,
                 clock: Callable[[], float] = time.time) -> None:
        self._listen = listen
        self.recent: deque[bytes] = deque(maxlen=history)
        self.tasks: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.max_tasks = tasks
        self.rates = Rates()
        self.client_buffer = client_buffer
        self.clients: set[Client] = set()
        #: Set while at least one browser is attached: the overview is polled only then.
        self.watched = asyncio.Event()
        #: How many events the subscription has delivered.
        self.received = 0
        self.error: str | None = None
        self._clock = clock
        self._run: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe (returns once the subscription is active), then read it in the
        background for as long as the hub runs."""
        events = await self._listen()
        self._run = asyncio.create_task(self._follow(events), name="qtasks-dashboard-hub")

    async def close(self) -> None:
        if self._run is not None:
            self._run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._run
            self._run = None

    async def _follow(self, events: AsyncIterator[ResultEvent]) -> None:
        """Read the subscription; should it fail, say so to the browsers and subscribe
        again, waiting longer each time (up to 10 s): a dashboard outlives a broker's
        restart."""
        pause = 0.5
        while True:
            try:
                async for event in events:
                    self.take(event)
                    pause = 0.5
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                log.warning("the dashboard's subscription failed (%s); subscribing again",
                            self.error)
                self.send("health", dumps({"listening": False, "error": self.error}))
            finally:
                await close_iterator(events)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 10.0)
            with contextlib.suppress(Exception):
                events = await self._listen()
                self.error = None
                self.send("health", dumps({"listening": True, "error": None}))

    def take(self, event: ResultEvent) -> None:
        """One event from the subscription: remembered, counted, offered to each browser."""
        self.received += 1
        entry = feed_entry(event)
        self.recent.append(entry)
        self.rates.add(event, self._clock())
        self._note_task(event)
        for client in self.clients:
            client.offer("event", entry)

    def _note_task(self, event: ResultEvent) -> None:
        summary = self.tasks.pop(event.id, None) or {"id": event.id, "task": event.task,
                                                     "status": "new", "partials": 0}
        summary["attempt"] = event.attempt
        summary["ts"] = event.ts
        if event.kind == "partial":
            summary["partials"] = event.seq + 1
        else:
            summary["status"] = event.status
            summary["worker"] = event.worker or summary.get("worker")
            if event.kind == "final":
                summary["partials"] = event.partials
        self.tasks[event.id] = summary
        while len(self.tasks) > self.max_tasks:
            self.tasks.popitem(last=False)

    def send(self, kind: str, data: bytes) -> None:
        """Push something other than an event (the overview, a health change) to all."""
        for client in self.clients:
            client.offer(kind, data)

    @contextlib.contextmanager
    def attach(self) -> Iterator[Client]:
        """A browser's ``Client`` for as long as it is connected."""
        client = Client(self.client_buffer)
        self.clients.add(client)
        self.watched.set()
        try:
            yield client
        finally:
            self.clients.discard(client)
            if not self.clients:
                self.watched.clear()

    def recent_tasks(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest known state of the most recently active tasks, newest first."""
        return [dict(t) for t in reversed(self.tasks.values())][:limit]
