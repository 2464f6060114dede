"""The embedded result store: every event of every task in a dict, for the result TTL.

It keeps the contract of the real stores: ``watch`` replays a task's events from the first
and then follows it live; ``listen`` pushes every event of a task name to live
subscribers; results expire ``ttl`` seconds after their final. ``memory://name`` shares one
state between every store of that name in the process.

Finished tasks are also bounded in number (``max_tasks``, oldest final dropped first):
the store lives in the application's own process, where a day of results at the default
TTL would otherwise grow without limit (1.8 KB per task, 345 MB after 200,000 tasks).
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from qtasks.brokers.memory import memory_options, subscription
from qtasks.errors import ConfigurationError
from qtasks.interfaces import ResultStore
from qtasks.protocol import ResultEvent

#: Finished tasks a memory store keeps at most (``memory://?max_tasks=N``), not counting
#: those whose submitter has not read the final yet, of which it keeps ``MAX_UNREAD``
#: (as many as the NATS store buffers for its submitter).
MAX_TASKS = 10_000
MAX_UNREAD = 100_000


class _TaskLog:
    __slots__ = ("awaited", "changed", "events", "latest")

    def __init__(self) -> None:
        self.events: list[ResultEvent] = []
        self.latest: ResultEvent | None = None
        self.changed: asyncio.Event = asyncio.Event()
        #: Its submitter (``expect``) has not read its final yet: kept beyond ``max_tasks``.
        self.awaited = False

    @property
    def finished(self) -> bool:
        return self.latest is not None and self.latest.kind == "final"


class ResultHub:
    """The shared state behind every ``MemoryResultStore`` of one name."""

    def __init__(self) -> None:
        self.logs: dict[str, _TaskLog] = {}
        #: Every finished task, by when its results expire (the TTL).
        self.expiry: list[tuple[float, str]] = []
        #: Finished tasks nobody waits for any more, oldest first (the ``max_tasks`` bound).
        self.done: OrderedDict[str, None] = OrderedDict()
        #: Finished tasks whose submitter has not read the final yet (``MAX_UNREAD``).
        self.unread: OrderedDict[str, None] = OrderedDict()
        self.listeners: dict[str, set[asyncio.Queue[ResultEvent]]] = {}

    def log(self, task_id: str) -> _TaskLog:
        log = self.logs.get(task_id)
        if log is None:
            log = self.logs[task_id] = _TaskLog()
        return log

    def release(self, task_id: str, keep: int) -> None:
        """A finished task nobody waits for any more: the oldest such beyond ``keep`` go.
        A task whose submitter has not read its final yet is never dropped for the count
        (a program that sends 20,000 tasks and then waits for each must get them all);
        the TTL still applies to it."""
        self.done[task_id] = None
        while len(self.done) > keep:
            self.logs.pop(self.done.popitem(last=False)[0], None)

    def hold(self, task_id: str) -> None:
        """A finished task its submitter has not read yet: kept, up to ``MAX_UNREAD``
        of them (a producer that never waits must not grow without bound either)."""
        self.unread[task_id] = None
        while len(self.unread) > MAX_UNREAD:
            self.logs.pop(self.unread.popitem(last=False)[0], None)

    def expire(self, now: float) -> None:
        """Drop finished tasks past their TTL."""
        while self.expiry and self.expiry[0][0] <= now:
            _, task_id = heapq.heappop(self.expiry)
            self.logs.pop(task_id, None)
            self.done.pop(task_id, None)
            self.unread.pop(task_id, None)

    def schedule(self, expires: float, task_id: str) -> None:
        """Expire ``task_id`` at ``expires``. Entries of tasks already dropped for the
        count stay in the heap until their time: when they outnumber the kept tasks, the
        heap is rebuilt without them, so it stays bounded with the tasks (it grew by
        200 bytes per task for the whole TTL, 40 MB per 200,000 tasks)."""
        heapq.heappush(self.expiry, (expires, task_id))
        if len(self.expiry) > 2 * (len(self.done) + len(self.unread)) + 1024:
            self.expiry = [entry for entry in self.expiry
                           if entry[1] in self.done or entry[1] in self.unread]
            heapq.heapify(self.expiry)


_HUBS: dict[str, ResultHub] = {}


def hub_for(url: str) -> ResultHub:
    parts = urlsplit(url)
    name = parts.netloc + parts.path
    if not name.strip("/"):
        return ResultHub()
    return _HUBS.setdefault(name, ResultHub())


class MemoryResultStore(ResultStore):
    def __init__(self, url: str = "memory://", **options: Any) -> None:
        self.url = url
        self.hub = hub_for(url)
        merged = memory_options(url, options)
        try:
            self.ttl = float(merged.get("ttl", self.ttl))
            max_tasks = int(merged.get("max_tasks", MAX_TASKS))
        except ValueError as exc:
            raise ConfigurationError(f"bad memory:// option value: {exc}") from None
        if self.ttl <= 0:
            raise ConfigurationError(f"ttl must be positive, not {self.ttl:g}")
        if max_tasks < 1:
            raise ConfigurationError(f"max_tasks must be at least 1, not {max_tasks}")
        self.max_tasks = max_tasks

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def expect(self, task_id: str) -> None:
        self.hub.log(task_id).awaited = True

    async def publish(self, event: ResultEvent, body: bytes, reply_to: str | None = None) -> None:
        hub = self.hub
        log = hub.log(event.id)
        again = log.finished  # a final published again (a redelivery): counted once
        log.events.append(event)
        if event.kind != "partial":
            log.latest = event
        if event.kind == "final" and not again:
            now = time.time()
            expires = now + self.ttl
            if event.expires_at is not None:
                expires = min(expires, event.expires_at)
            hub.expire(now)
            if log.awaited:
                hub.hold(event.id)
            else:
                hub.release(event.id, self.max_tasks)
            hub.schedule(expires, event.id)
        log.changed.set()
        log.changed = asyncio.Event()
        for name in (event.task, "*"):
            for queue in hub.listeners.get(name, ()):
                queue.put_nowait(event)

    async def get(self, task_id: str) -> ResultEvent | None:
        self.hub.expire(time.time())  # on time even when no other task finishes
        log = self.hub.logs.get(task_id)
        return log.latest if log else None

    async def watch(self, task_id: str) -> AsyncIterator[ResultEvent]:
        hub = self.hub
        hub.expire(time.time())
        log = hub.log(task_id)
        index = 0
        while True:
            changed = log.changed
            while index < len(log.events):
                event = log.events[index]
                index += 1
                if event.kind == "final" and log.awaited:
                    log.awaited = False  # read: from now on it counts toward max_tasks
                    hub.unread.pop(task_id, None)
                    hub.release(task_id, self.max_tasks)
                yield event
                if event.kind == "final":
                    return
            await changed.wait()

    async def listen(self, task_name: str) -> AsyncIterator[ResultEvent]:
        queue: asyncio.Queue[ResultEvent] = asyncio.Queue()
        subscribers = self.hub.listeners.setdefault(task_name, set())
        subscribers.add(queue)
        return subscription(queue, subscribers)
