"""The NATS consumer: pull requests on each queue's durable consumer, and deliveries.

Why pull requests are issued by hand instead of through ``PullSubscription.fetch``: the
worker's prefetch bound must count every message the server may still hand us, and fetch
hides how many a pending request can still deliver; across a reconnect it also raises
timeouts that would end a naive consume loop. Here each queue has at most one outstanding
pull request, sized from the free prefetch credit (``Consumption.take_credit``); it ends
on a status (408 expired, 409, 503), when its batch is filled, when it goes silent (no
message or idle heartbeat), or at a reconnect, and the next one is sent. A message that
arrives for a request already given up (a straggler after a reconnect) is still
delivered: it waits in the ready queue until a slot is free.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from nats.aio.msg import Msg

from qtasks.brokers.nats.connection import Connection, Subscribed
from qtasks.brokers.nats.dead_letters import DeadLetters
from qtasks.brokers.nats.topology import NOT_BEFORE, Topology, read_float
from qtasks.interfaces import DeadLetterReason, Delivery

log = logging.getLogger(__name__)

#: Seconds between the server's idle heartbeats on a waiting pull request.
HEARTBEAT = 1.0


class NatsDelivery(Delivery):
    """One JetStream message leased to this worker until settled."""

    def __init__(self, consumption: Consumption, msg: Msg, queue: str) -> None:
        self.consumption = consumption
        self.msg = msg
        self.queue = queue
        self.body = msg.data
        self.delivered = msg.metadata.num_delivered
        self.redelivered = self.delivered > 1
        self.yielded = False
        self.settled = False

    def __repr__(self) -> str:
        seq = self.msg.metadata.sequence.stream
        return f"<NatsDelivery queue={self.queue} seq={seq} delivered={self.delivered}>"

    async def _settle(self, what: str, send: Callable[[], Awaitable[None]]) -> None:
        """Send one acknowledgement; a dead connection is logged, never raised: the
        server hands the message out again after ``ack_wait`` by itself."""
        if self.settled:
            return
        self.settled = True
        try:
            await send()
        except Exception as exc:
            log.warning("could not %s %r (%s: %s); the server redelivers it after ack_wait",
                        what, self, type(exc).__name__, exc)
        finally:
            self.consumption.settled(self)

    async def ack(self) -> None:
        await self._settle("ack", self.msg.ack)

    async def retry_later(self, delay: float) -> None:
        await self._settle("nak", lambda: self.msg.nak(delay=max(delay, 0.001)))

    async def requeue(self) -> None:
        await self._settle("requeue", self.msg.nak)

    async def keep_alive(self) -> None:
        if self.settled:
            return
        try:
            await self.msg.in_progress()
        except Exception as exc:
            log.warning("could not extend the lease of %r: %s", self, exc)

    async def dead_letter(self, reason: str) -> None:
        if self.settled:
            return
        try:
            await self.consumption.dead_letters.publish(self.msg, self.queue, reason)
        except Exception as exc:
            # Not acked: the server redelivers it and it is dead-lettered again then.
            log.error("could not dead-letter %r (%s: %s); left for redelivery",
                      self, type(exc).__name__, exc)
            self.settled = True
            self.consumption.settled(self)
            return
        await self._settle("ack (after dead-lettering)", self.msg.ack)


class _Request:
    """One pull request in flight: how many messages it may still deliver, and until when
    we wait for a sign of life (a message or an idle heartbeat) before giving it up."""

    __slots__ = ("deadline", "ended", "expires", "fetcher", "id", "remaining")

    def __init__(self, fetcher: _Fetcher, request_id: str, batch: int, expires: float) -> None:
        self.fetcher = fetcher
        self.id = request_id
        self.remaining = batch
        self.expires = expires
        self.ended = asyncio.Event()
        self.deadline = 0.0
        self.alive()

    @property
    def heartbeat(self) -> bool:
        return self.expires > 2 * HEARTBEAT

    def alive(self) -> None:
        silence = 2 * HEARTBEAT if self.heartbeat else self.expires
        self.deadline = time.monotonic() + silence + 1.0


class _Fetcher:
    """Keeps one pull request outstanding on one queue's consumer while credit allows."""

    def __init__(self, consumption: Consumption, queue: str) -> None:
        self.consumption = consumption
        self.queue = queue
        self.current: _Request | None = None
        self.trouble = ""
        self.busy = False  # the last request filled its batch: there is a backlog

    def end(self, trouble: str = "") -> None:
        """Close the current request and give back the credit it can no longer use."""
        request = self.current
        if request is None:
            return
        self.current = None
        self.consumption.requests.pop(request.id, None)
        self.consumption.give_credit(request.remaining)
        self.trouble = trouble
        request.ended.set()

    async def run(self) -> None:
        consumption = self.consumption
        backoff = 0.1
        while True:
            batch = await consumption.take_credit(self)
            request = _Request(self, consumption.new_request_id(), batch,
                               consumption.expires_for(self))
            self.current = request
            consumption.requests[request.id] = request
            try:
                await consumption.pull(self.queue, request)
                while not request.ended.is_set():
                    left = request.deadline - time.monotonic()
                    if left <= 0:
                        self.end(trouble="pull request went silent")
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(request.ended.wait(), left)
            except asyncio.CancelledError:
                self.end()
                raise
            except Exception as exc:
                self.end(trouble=f"{type(exc).__name__}: {exc}")
            self.busy = request.remaining == 0 and not self.trouble
            if not self.trouble:
                backoff = 0.1
                continue
            log.info("queue %s: %s; pulling again in %.1f s", self.queue, self.trouble, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
            try:
                await consumption.topology.declare_consumer(self.queue)  # if it was lost
            except Exception as exc:
                log.info("queue %s: cannot declare its consumer yet: %s", self.queue, exc)


class Consumption:
    """State of one ``consume()``: fetchers per queue feeding a ready queue.

    ``credit`` is prefetch minus what is requested or received and unsettled; it goes
    negative only when stragglers arrive. ``slots`` bounds what is yielded. Every
    delivery received is in ``unsettled`` (the broker's, shared by its consumptions)
    until settled.
    """

    def __init__(self, conn: Connection, topology: Topology, dead_letters: DeadLetters,
                 unsettled: set[NatsDelivery], queues: Sequence[str], prefetch: int, *,
                 max_deliver: int, fetch_timeout: float,
                 on_dead_letter: Callable[[str, DeadLetterReason, str], None] | None = None,
                 ) -> None:
        self.conn = conn
        #: Told of each message this consumer dead-letters on its own (``Broker``).
        self.on_dead_letter = on_dead_letter
        self.topology = topology
        self.dead_letters = dead_letters
        self.unsettled = unsettled
        self.max_deliver = max_deliver
        self.fetch_timeout = fetch_timeout
        self.prefetch = prefetch
        self.credit = prefetch
        self.credit_changed = asyncio.Event()
        self._turn = asyncio.Lock()
        self.slots = asyncio.Semaphore(prefetch)
        self.ready: asyncio.Queue[NatsDelivery] = asyncio.Queue()
        self.fetchers = {topology.subject(q): _Fetcher(self, q) for q in queues}
        self.requests: dict[str, _Request] = {}
        self.inbox = conn.nc.new_inbox()
        self._ids = itertools.count()
        self._sub: Subscribed | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._sub = await self.conn.subscribe(
            f"{self.inbox}.*", self._on_msg, pending_msgs_limit=max(1024, 4 * self.prefetch))
        self._tasks = [asyncio.create_task(f.run(), name=f"qtasks-nats-fetch-{f.queue}")
                       for f in self.fetchers.values()]

    async def stop(self) -> None:
        """Stop pulling and give back what was received but not yielded."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        while not self.ready.empty():
            await self.ready.get_nowait().requeue()

    def new_request_id(self) -> str:
        return str(next(self._ids))

    async def pull(self, queue: str, request: _Request) -> None:
        body = {"batch": request.remaining, "expires": int(request.expires * 1e9)}
        if request.heartbeat:
            body["idle_heartbeat"] = int(HEARTBEAT * 1e9)
        await self.conn.nc.publish(self.topology.next_subject(queue), json.dumps(body).encode(),
                                   reply=f"{self.inbox}.{request.id}")

    async def take_credit(self, fetcher: _Fetcher) -> int:
        """Wait for free credit, in turn (the lock is FIFO), then take what this queue
        should ask for: on a single queue, all of it; on several, one slot while the queue
        is idle (enough to see new work), and when busy all but one slot for each other
        queue waiting its turn."""
        async with self._turn:
            while self.credit < 1:
                self.credit_changed.clear()
                await self.credit_changed.wait()
            if len(self.fetchers) == 1:
                share = self.credit
            elif fetcher.busy:
                waiting = sum(1 for f in self.fetchers.values()
                              if f is not fetcher and f.current is None)
                share = max(1, self.credit - waiting)
            else:
                share = 1
            self.credit -= share
            return share

    def expires_for(self, fetcher: _Fetcher) -> float:
        """An idle queue among several holds its slot at most a second at a time, so that
        a busy queue waiting for that slot gets it soon."""
        if len(self.fetchers) == 1 or fetcher.busy:
            return self.fetch_timeout
        return min(1.0, self.fetch_timeout)

    def give_credit(self, amount: int) -> None:
        if amount:
            self.credit += amount
            self.credit_changed.set()

    def settled(self, delivery: NatsDelivery) -> None:
        self.unsettled.discard(delivery)
        self.give_credit(1)
        if delivery.yielded:
            self.slots.release()

    def end_all(self) -> None:
        """After a reconnect the server may have forgotten our pull requests."""
        for fetcher in self.fetchers.values():
            fetcher.end()

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is not None and not msg.data:
            request = self.requests.get(msg.subject.rpartition(".")[2])
            if request is None:
                return  # about a request already given up
            if status == "100":
                request.alive()
            else:
                description = headers.get("Description", "")
                request.fetcher.end(
                    trouble="" if status in ("404", "408") else f"{status} {description}")
            return
        fetcher = self.fetchers.get(msg.subject)
        if fetcher is None or not msg.reply:
            log.warning("unexpected message on the pull inbox: %s", msg.subject)
            return
        request = fetcher.current
        if request is not None and request.remaining > 0:
            request.remaining -= 1
            request.alive()
            if request.remaining == 0:
                fetcher.end()
        else:
            self.credit -= 1  # a straggler: received without a reservation
        delivery = NatsDelivery(self, msg, fetcher.queue)
        self.unsettled.add(delivery)
        self._screen(delivery)

    def _screen(self, delivery: NatsDelivery) -> None:
        """Handle, without a worker slot, what must not run now: a message due later goes
        back with ``nak(delay)``; one delivered more than ``max_deliver`` times (its
        workers died or stalled) goes to the dead-letter stream."""
        headers = delivery.msg.headers or {}
        not_before = read_float(headers.get(NOT_BEFORE))
        wait = not_before - time.time() if not_before is not None else 0.0
        allowed = self.max_deliver + (1 if not_before is not None else 0)
        if self.max_deliver > 0 and delivery.delivered > allowed:
            reason = (f"delivered {delivery.delivered} times, over max_deliver="
                      f"{self.max_deliver}: the workers running it died or stalled")
            log.error("dead-lettering %r: %s", delivery, reason)
            self._side(delivery.dead_letter(reason))
            if self.on_dead_letter is not None:
                self.on_dead_letter(delivery.queue, "delivery_limit", reason)
        elif wait > 0.001:
            self._side(delivery.retry_later(wait))
        else:
            self.ready.put_nowait(delivery)

    def _side(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)
