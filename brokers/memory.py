"""The embedded broker: asyncio structures in one process, with a real broker's semantics.

Priorities, delays, prefetch bounds, redelivery of what a closed consumer held, and a
dead-letter list behave as on RabbitMQ or NATS, so that code and tests written against the
default move to a server unchanged. ``memory://`` gives each broker its own state;
``memory://name`` shares one state between every broker of that name in the process (a
producer app and a worker app in one test, say).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from qtasks.errors import ConfigurationError, LeadershipLost
from qtasks.interfaces import (
    Broker,
    DeadLetter,
    Delivery,
    Leadership,
    QueueStats,
    dead_letter_ref,
)
from qtasks.protocol import TaskMessage

T = TypeVar("T")


#: What a ``memory://`` URL may set. One URL commonly serves both the broker and the
#: result store, so each accepts the other's options; anything else is a typo.
OPTIONS = ("max_tasks", "ttl")


def memory_options(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """The URL's query merged with keyword ``options`` (which win), refusing unknown
    names rather than ignoring them."""
    merged: dict[str, Any] = {**dict(parse_qsl(urlsplit(url).query)), **options}
    unknown = sorted(set(merged) - set(OPTIONS))
    if unknown:
        raise ConfigurationError(f"unknown memory:// option(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(OPTIONS)}")
    return merged


@dataclass(order=True, slots=True)
class _Entry:
    sort_key: tuple[float, int]
    body: bytes = field(compare=False)
    priority: int = field(compare=False, default=0)
    redelivered: bool = field(compare=False, default=False)


class MemoryHub:
    """The shared state behind every ``MemoryBroker`` of one name."""

    def __init__(self) -> None:
        self.ready: dict[str, list[_Entry]] = {}
        self.delayed: dict[str, list[_Entry]] = {}
        self.dead: list[DeadLetter] = []
        self.order = itertools.count()
        self.changed: asyncio.Condition | None = None
        self.control: set[asyncio.Queue[bytes]] = set()
        #: Periodic schedulers: the leader of each group, and what leaders recorded.
        self.leaders: dict[str, MemoryLeadership] = {}
        self.beat_state: dict[str, dict[str, float]] = {}

    def condition(self) -> asyncio.Condition:
        if self.changed is None:
            self.changed = asyncio.Condition()
        return self.changed

    async def put(self, queue: str, body: bytes, priority: int, not_before: float | None,
                  redelivered: bool = False) -> None:
        seq = next(self.order)
        async with self.condition():
            if not_before is not None and not_before > time.time():
                heap = self.delayed.setdefault(queue, [])
                heapq.heappush(heap, _Entry((not_before, seq), body, priority, redelivered))
            else:
                heap = self.ready.setdefault(queue, [])
                heapq.heappush(heap, _Entry((-priority, seq), body, priority, redelivered))
            self.condition().notify_all()

    def _promote_due(self, now: float) -> float | None:
        """Move due delayed entries to their ready heap; return the next due time."""
        next_due: float | None = None
        for queue, heap in self.delayed.items():
            while heap and heap[0].sort_key[0] <= now:
                entry = heapq.heappop(heap)
                entry.sort_key = (-entry.priority, entry.sort_key[1])
                heapq.heappush(self.ready.setdefault(queue, []), entry)
            if heap and (next_due is None or heap[0].sort_key[0] < next_due):
                next_due = heap[0].sort_key[0]
        return next_due

    async def take(self, queues: Sequence[str]) -> tuple[str, _Entry]:
        """The highest-priority ready entry across ``queues``, waiting for one if needed."""
        cond = self.condition()
        async with cond:
            while True:
                next_due = self._promote_due(time.time())
                best: tuple[str, _Entry] | None = None
                for queue in queues:
                    heap = self.ready.get(queue)
                    if heap and (best is None or heap[0] < best[1]):
                        best = (queue, heap[0])
                if best is not None:
                    heapq.heappop(self.ready[best[0]])
                    return best
                timeout = None if next_due is None else max(0.0, next_due - time.time())
                try:
                    await asyncio.wait_for(cond.wait(), timeout)
                except TimeoutError:
                    pass

    def depth(self, queue: str) -> int:
        return len(self.ready.get(queue, ())) + len(self.delayed.get(queue, ()))


_HUBS: dict[str, MemoryHub] = {}


def hub_for(url: str) -> MemoryHub:
    name = urlsplit(url).netloc + urlsplit(url).path
    if not name.strip("/"):
        return MemoryHub()
    return _HUBS.setdefault(name, MemoryHub())


class MemoryDelivery(Delivery):
    def __init__(self, broker: MemoryBroker, queue: str, entry: _Entry,
                 release: asyncio.Semaphore) -> None:
        self.broker = broker
        self.queue = queue
        self.entry = entry
        self.body = entry.body
        self.redelivered = entry.redelivered
        self._release = release
        self._settled = False

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        self.broker.unsettled.discard(self)
        self._release.release()
        return True

    async def ack(self) -> None:
        self._settle()

    async def retry_later(self, delay: float) -> None:
        if self._settle():
            await self.broker.hub.put(self.queue, self.body, self.entry.priority,
                                      time.time() + delay, redelivered=True)

    async def requeue(self) -> None:
        if self._settle():
            await self.broker.hub.put(self.queue, self.body, self.entry.priority, None,
                                      redelivered=True)

    async def dead_letter(self, reason: str) -> None:
        if self._settle():
            self.broker.hub.dead.append(DeadLetter(
                dead_letter_ref(self.body), self.queue, self.body, reason, time.time()))


class MemoryLeadership(Leadership):
    """A turn as a group's periodic scheduler among the brokers of one hub; it ends when
    its broker closes (as a process's connection does when it dies)."""

    def __init__(self, hub: MemoryHub, group: str) -> None:
        self.hub = hub
        self.group = group
        self.state = dict(hub.beat_state.get(group, {}))
        self.lost = asyncio.Event()

    async def commit(self, messages: Sequence[tuple[TaskMessage, bytes]],
                     state: Mapping[str, float]) -> None:
        if self.lost.is_set() or self.hub.leaders.get(self.group) is not self:
            raise LeadershipLost(f"no longer the scheduler of {self.group!r}")
        for message, body in messages:
            await self.hub.put(message.queue, body, message.priority, message.not_before)
        self.hub.beat_state[self.group] = dict(state)

    async def resign(self) -> None:
        await self.end(lost=False)

    async def end(self, lost: bool) -> None:
        if lost:
            self.lost.set()
        if self.hub.leaders.get(self.group) is self:
            del self.hub.leaders[self.group]
            async with self.hub.condition():
                self.hub.condition().notify_all()


class MemoryBroker(Broker):
    """In-process broker; the app runs an embedded worker on it by itself."""

    embedded = True

    def __init__(self, url: str = "memory://", **options: Any) -> None:
        memory_options(url, options)
        self.url = url
        self.hub = hub_for(url)
        self.unsettled: set[MemoryDelivery] = set()
        self.leaderships: set[MemoryLeadership] = set()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for delivery in list(self.unsettled):
            await delivery.requeue()
        for turn in list(self.leaderships):
            await turn.end(lost=True)
        self.leaderships.clear()

    async def publish(self, message: TaskMessage, body: bytes) -> None:
        await self.hub.put(message.queue, body, message.priority, message.not_before)

    async def consume(self, queues: Sequence[str], prefetch: int) -> AsyncIterator[Delivery]:
        slots = asyncio.Semaphore(prefetch)
        while True:
            await slots.acquire()
            try:
                queue, entry = await self.hub.take(queues)
            except BaseException:
                slots.release()
                raise
            delivery = MemoryDelivery(self, queue, entry, slots)
            self.unsettled.add(delivery)
            yield delivery

    async def broadcast(self, body: bytes) -> None:
        for subscriber in self.hub.control:
            subscriber.put_nowait(body)

    async def control(self) -> AsyncIterator[bytes]:
        received: asyncio.Queue[bytes] = asyncio.Queue()
        self.hub.control.add(received)
        return subscription(received, self.hub.control)

    async def inspect(self, queues: Sequence[str]) -> list[QueueStats]:
        in_flight: dict[str, int] = {}
        for delivery in self.unsettled:
            in_flight[delivery.queue] = in_flight.get(delivery.queue, 0) + 1
        return [QueueStats(q, self.hub.depth(q), in_flight.get(q, 0)) for q in queues]

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return self.hub.dead[:limit]

    async def lead(self, group: str, ttl: float) -> Leadership:
        cond = self.hub.condition()
        async with cond:
            while group in self.hub.leaders:
                await cond.wait()
            turn = self.hub.leaders[group] = MemoryLeadership(self.hub, group)
        self.leaderships.add(turn)
        return turn

    async def dead_count(self) -> int:
        return len(self.hub.dead)

    async def requeue_dead(self, refs: Sequence[str] | None = None) -> list[str]:
        chosen = [d for d in self.hub.dead if refs is None or d.ref in refs]
        for letter in chosen:
            self.hub.dead.remove(letter)
            await self.hub.put(letter.queue, letter.body, 0, None)
        return [letter.ref for letter in chosen]

    async def purge_dead(self) -> int:
        count = len(self.hub.dead)
        self.hub.dead.clear()
        return count


async def subscription(queue: asyncio.Queue[T], subscribers: set[asyncio.Queue[T]],
                       ) -> AsyncIterator[T]:
    """What is put on ``queue``, one of ``subscribers``, until the iterator is closed;
    then it leaves them. The in-memory fan-out of control messages and result events."""
    try:
        while True:
            yield await queue.get()
    finally:
        subscribers.discard(queue)
