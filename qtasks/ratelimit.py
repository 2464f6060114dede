"""Rate limits: ``@app.task(rate_limit="100/s")`` (also ``/m``, ``/h``), per worker process
as in Celery.

How a limited task waits, and why this way (``docs/periodic.md`` has the user's view):
each task name has a schedule of start slots ``1/rate`` apart. A delivery that finds no
free slot is given the next one and *handed back to the broker* until then
(``Delivery.retry_later``): it holds neither a concurrency slot (the broker's prefetch,
which is the worker's concurrency) nor a lease while it waits, so the tasks behind it in
the queue run meanwhile, and a wait of an hour costs nothing (RabbitMQ would close a
channel that holds a message past its ``consumer_timeout``). When the message comes back
it starts on the slot kept for it. A wait shorter than ``PARK`` is cheaper than the round
trip and is waited in place.

Parking the deliveries inside the worker instead (Celery's way) holds their prefetch
slots, so a burst of limited tasks would hold up every other task of the queue; a broker
whose prefetch could be raised while a task waits could avoid that, but NATS's and
RabbitMQ's consumers here count prefetch as concurrency, which is what the worker's
``--concurrency`` promises.

Nothing is lost and the message is not changed: the same body comes back, with the same
attempt, priority and id (no new attempt, no result event). Order: slots are handed out
in the order the messages reach this worker, so they start in that order.

With several workers a message handed back by one may come back to another. Slots are
therefore interchangeable: one whose message has not come back ``tolerance`` after it
is due goes to the next message of the same task that arrives, so the workers' slots are
used whoever gets which message; at worst a slot is wasted (the limit is an upper bound).
"""

from __future__ import annotations

import asyncio
import heapq
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from qtasks.errors import ConfigurationError
from qtasks.interfaces import Delivery

#: Seconds per unit of a rate string.
UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*$")
#: A wait up to this many seconds is waited in place, holding the slot: shorter than a
#: round trip through the broker, and at most ``PARK * rate`` deliveries of a task do so.
PARK = 0.02


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``count`` starts per ``per`` seconds in one worker process."""

    count: float
    per: float
    text: str

    @property
    def interval(self) -> float:
        """Seconds between two starts."""
        return self.per / self.count

    def __str__(self) -> str:
        return self.text


def parse_rate(value: object) -> RateLimit | None:
    """``"100/s"``, ``"10/m"``, ``"1/h"`` (a whole or decimal count) to a ``RateLimit``;
    None stays None. Anything else is refused at declaration, naming the value."""
    if value is None:
        return None
    match = _RATE.match(value) if isinstance(value, str) else None
    count = float(match.group(1)) if match else 0.0
    if match is None or not count > 0 or math.isinf(count):
        raise ConfigurationError(
            f"rate_limit must be a string like '100/s', '10/m' or '1/h' (a positive "
            f"number of starts per second, minute or hour), not {value!r}")
    return RateLimit(count, UNITS[match.group(2)], f"{match.group(1)}/{match.group(2)}")


@dataclass(slots=True)
class _Slot:
    at: float
    #: How long after ``at`` the slot stays its message's alone (the broker's delay is
    #: rounded, and a round trip takes time), then how long anyone may take it.
    tolerance: float


@dataclass(slots=True)
class _Schedule:
    """The start slots of one task name: the next free one, and those kept for messages
    handed back (by message key), oldest first in ``order``."""

    next_free: float = 0.0
    kept: dict[tuple[str, int], _Slot] = field(default_factory=dict)
    order: list[tuple[float, tuple[str, int]]] = field(default_factory=list)

    def drop_stale(self, now: float) -> None:
        while self.order:
            at, key = self.order[0]
            slot = self.kept.get(key)
            if slot is not None and slot.at == at and now < at + 4 * slot.tolerance:
                return
            heapq.heappop(self.order)
            if slot is not None and slot.at == at:
                del self.kept[key]  # its message never came back here: the slot is wasted

    def overdue(self, now: float) -> _Slot | None:
        """The oldest kept slot whose message is late past its tolerance, taken."""
        self.drop_stale(now)
        if not self.order:
            return None
        at, key = self.order[0]
        slot = self.kept[key]
        if now < at + slot.tolerance:
            return None
        heapq.heappop(self.order)
        del self.kept[key]
        return slot


class RateLimiter:
    """The start slots of every rate-limited task name of one worker process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, park: float = PARK) -> None:
        self.clock = clock
        self.park = park
        self._schedules: dict[str, _Schedule] = {}
        #: Deliveries handed back so far (for tests and the worker's figures).
        self.handed_back = 0

    def wait(self, name: str, limit: RateLimit, key: tuple[str, int]) -> float:
        """Seconds until the message ``key`` (task id, attempt) of task ``name`` may start.

        0: it starts now. Up to ``park``: its slot is taken and the caller waits in place.
        More: the slot is kept for ``key`` and the caller hands the message back."""
        now = self.clock()
        schedule = self._schedules.setdefault(name, _Schedule(next_free=now))
        slot = schedule.kept.get(key)
        if slot is not None:  # its own slot, kept when it was handed back
            wait = slot.at - now
            if wait <= self.park:
                del schedule.kept[key]  # its entry in ``order`` goes when it comes first
                return max(wait, 0.0)
            return wait  # back early (a broker may round a delay down): again
        if schedule.overdue(now) is not None:
            return 0.0
        at = max(now, schedule.next_free)
        schedule.next_free = at + limit.interval
        wait = at - now
        if wait > self.park:
            slot = _Slot(at, 0.25 + 0.02 * wait)
            schedule.kept[key] = slot
            heapq.heappush(schedule.order, (at, key))
        return wait

    async def pace(self, delivery: Delivery, name: str, limit: RateLimit | None,
                   key: tuple[str, int]) -> bool:
        """Wait for a start slot of ``name``: in place if it is near, else by handing
        ``delivery`` back until then. True when it was handed back (the caller is done
        with it: it comes back later)."""
        if limit is None:
            return False
        wait = self.wait(name, limit, key)
        if wait <= 0:
            return False
        if wait <= self.park:
            await asyncio.sleep(wait)
            return False
        self.handed_back += 1
        await delivery.retry_later(wait)
        return True
