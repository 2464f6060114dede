"""NATS JetStream broker (nats-py): tasks in through a work-queue stream.

Layout (all names derive from ``prefix``, see ``docs/nats.md``):

- stream ``{prefix}_TASKS`` (work-queue retention, file storage) captures
  ``{prefix}.tasks.>``; a task for queue ``q`` is published on ``{prefix}.tasks.<q>``;
- one durable pull consumer ``{prefix}_q_<q>`` per queue, shared by every worker
  (competing consumers), explicit acks;
- stream ``{prefix}_DEAD`` captures ``{prefix}.dead.>``: dead letters, byte for byte, with
  the reason in headers.

Why pull requests are issued by hand instead of through ``PullSubscription.fetch``: the
worker's prefetch bound must count every message the server may still hand us, and fetch
hides how many a pending request can still deliver; across a reconnect it also raises
timeouts that would end a naive consume loop. Here each queue has at most one outstanding
pull request, sized from the free prefetch credit (``_Consumption.take_credit``); it ends
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
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from qtasks.brokers.nats.connection import Connection, number, parse_url, token
from qtasks.errors import ConfigurationError, MessageTooLargeError
from qtasks.interfaces import Broker, DeadLetter, Delivery, QueueStats
from qtasks.protocol import TaskMessage

log = logging.getLogger("qtasks.nats.broker")

#: Header names, part of the documented wire format.
MSG_ID = "Nats-Msg-Id"
NOT_BEFORE = "QTasks-Not-Before"
DEAD_REASON = "QTasks-Dead-Reason"
DEAD_SUBJECT = "QTasks-Original-Subject"
DEAD_QUEUE = "QTasks-Queue"
DEAD_DELIVERED = "QTasks-Delivered"
DEAD_AT = "QTasks-Dead-At"

#: Bytes of ``max_payload`` kept for headers: the server closes the connection of a
#: client whose message (headers + body) is over ``max_payload``.
HEADER_RESERVE = 512
_MAX_REASON = 1024
#: Seconds between the server's idle heartbeats on a waiting pull request.
HEARTBEAT = 1.0


class NatsDelivery(Delivery):
    """One JetStream message leased to this worker until settled."""

    def __init__(self, consumption: _Consumption, msg: Msg, queue: str) -> None:
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
            await self.consumption.broker.publish_dead(self.msg, self.queue, reason)
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

    def __init__(self, consumption: _Consumption, queue: str) -> None:
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
                await consumption.broker.declare_consumer(self.queue)  # in case it was lost
            except Exception as exc:
                log.info("queue %s: cannot declare its consumer yet: %s", self.queue, exc)


class _Consumption:
    """State of one ``consume()``: fetchers per queue feeding a ready queue.

    ``credit`` is prefetch minus what is requested or received and unsettled; it goes
    negative only when stragglers arrive. ``slots`` bounds what is yielded.
    """

    def __init__(self, broker: NatsBroker, queues: Sequence[str], prefetch: int) -> None:
        self.broker = broker
        self.prefetch = prefetch
        self.credit = prefetch
        self.credit_changed = asyncio.Event()
        self._turn = asyncio.Lock()
        self.slots = asyncio.Semaphore(prefetch)
        self.ready: asyncio.Queue[NatsDelivery] = asyncio.Queue()
        self.fetchers = {broker.subject(q): _Fetcher(self, q) for q in queues}
        self.requests: dict[str, _Request] = {}
        self.inbox = broker.conn.nc.new_inbox()
        self._ids = itertools.count()
        self._sub: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._sub = await self.broker.conn.nc.subscribe(
            f"{self.inbox}.*", cb=self._on_msg, pending_msgs_limit=max(1024, 4 * self.prefetch))
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
            with contextlib.suppress(Exception):
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
        await self.broker.conn.nc.publish(self.broker.next_subject(queue),
                                          json.dumps(body).encode(),
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
            return self.broker.fetch_timeout
        return min(1.0, self.broker.fetch_timeout)

    def give_credit(self, amount: int) -> None:
        if amount:
            self.credit += amount
            self.credit_changed.set()

    def settled(self, delivery: NatsDelivery) -> None:
        self.broker.unsettled.discard(delivery)
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
        self.broker.unsettled.add(delivery)
        self._screen(delivery)

    def _screen(self, delivery: NatsDelivery) -> None:
        """Handle, without a worker slot, what must not run now: a message due later goes
        back with ``nak(delay)``; one delivered more than ``max_deliver`` times (its
        workers died or stalled) goes to the dead-letter stream."""
        headers = delivery.msg.headers or {}
        not_before = _float(headers.get(NOT_BEFORE))
        wait = not_before - time.time() if not_before is not None else 0.0
        allowed = self.broker.max_deliver + (1 if not_before is not None else 0)
        if self.broker.max_deliver > 0 and delivery.delivered > allowed:
            reason = (f"delivered {delivery.delivered} times, over max_deliver="
                      f"{self.broker.max_deliver}: the workers running it died or stalled")
            log.error("dead-lettering %r: %s", delivery, reason)
            self._side(delivery.dead_letter(reason))
        elif wait > 0.001:
            self._side(delivery.retry_later(wait))
        else:
            self.ready.put_nowait(delivery)

    def _side(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


class NatsBroker(Broker):
    """Tasks through JetStream; see the module docstring and ``docs/nats.md``."""

    supports_priority = False  # JetStream has no message priority; use separate queues
    deduplicates = True  # Nats-Msg-Id = task id, within the stream's duplicate window

    def __init__(self, url: str = "nats://127.0.0.1:4222", **options: Any) -> None:
        self.url = url
        servers, self.options = parse_url(url, options)
        self.prefix: str = self.options["prefix"]
        self.ack_wait = number(self.options, "ack_wait", 30.0)
        self.max_deliver = int(number(self.options, "max_deliver", 5))
        self.max_ack_pending = int(number(self.options, "max_ack_pending", -1))
        self.fetch_timeout = number(self.options, "fetch_timeout", 5.0)
        if self.fetch_timeout < 2 * HEARTBEAT:
            raise ConfigurationError(f"NATS fetch_timeout must be at least {2 * HEARTBEAT} s")
        self.dead_letter_ttl = number(self.options, "dead_letter_ttl", 0.0)
        self.replicas = int(number(self.options, "replicas", 1))
        self.lease_interval = self.ack_wait / 3
        self.conn = Connection(url, servers, self.options, "broker")
        self.conn.reconnect_listeners.append(self._on_reconnect)
        self.stream = f"{self.prefix}_TASKS"
        self.dead_stream = f"{self.prefix}_DEAD"
        self.unsettled: set[NatsDelivery] = set()
        self._consumers: set[str] = set()
        self._consumptions: set[_Consumption] = set()

    # -- names ---------------------------------------------------------------------

    def subject(self, queue: str) -> str:
        return f"{self.prefix}.tasks.{token(queue)}"

    def consumer(self, queue: str) -> str:
        return f"{self.prefix}_q_{token(queue)}"

    def next_subject(self, queue: str) -> str:
        return f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer(queue)}"

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        await self.conn.start(self._declare)

    async def _declare(self) -> None:
        self.max_message_size = self.conn.max_payload - HEADER_RESERVE
        storage, replicas = StorageType.FILE, self.replicas
        await self.conn.ensure_stream(StreamConfig(
            name=self.stream, subjects=[f"{self.prefix}.tasks.>"],
            retention=RetentionPolicy.WORK_QUEUE, storage=storage, num_replicas=replicas,
            description="QTasks task messages, one subject per queue"))
        await self.conn.ensure_stream(StreamConfig(
            name=self.dead_stream, subjects=[f"{self.prefix}.dead.>"], storage=storage,
            num_replicas=replicas, max_age=self.dead_letter_ttl or None,
            description="QTasks dead letters: original body, reason in headers"))

    async def close(self) -> None:
        if not self.conn.started:
            return
        for consumption in list(self._consumptions):
            await consumption.stop()
        for delivery in list(self.unsettled):
            await delivery.requeue()
        await self.conn.close()

    async def declare(self, queues: Sequence[str]) -> None:
        await self.start()
        for queue in queues:
            if queue not in self._consumers:
                await self.declare_consumer(queue)

    async def declare_consumer(self, queue: str) -> None:
        name = self.consumer(queue)
        config = ConsumerConfig(
            name=name, durable_name=name, ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL, ack_wait=self.ack_wait, max_deliver=-1,
            filter_subject=self.subject(queue), max_ack_pending=self.max_ack_pending,
            description=f"QTasks workers of queue {queue!r}")
        js = self.conn.js
        await self.conn.retry(f"create consumer {name}",
                              lambda: js.add_consumer(self.stream, config))
        self._consumers.add(queue)

    def _on_reconnect(self) -> None:
        for consumption in self._consumptions:
            consumption.end_all()

    # -- tasks in and out ----------------------------------------------------------

    async def publish(self, message: TaskMessage, body: bytes) -> None:
        """Publish and wait for the PubAck, retrying through a reconnect for
        ``publish_timeout``; ``Nats-Msg-Id`` makes a retried publish count once."""
        subject = self.subject(message.queue)
        headers = {MSG_ID: f"{message.id}:{message.attempt}"}
        if message.not_before is not None:
            headers[NOT_BEFORE] = repr(message.not_before)
        await self.start()  # a no-op once started; lets a bare broker publish at once
        self._check_size(message, body, headers)
        conn = self.conn
        await conn.retry(f"publish task {message.id}", lambda: conn.publish(
            subject, body, headers=headers, stream=self.stream))

    def _check_size(self, message: TaskMessage, body: bytes, headers: dict[str, str]) -> None:
        size = len(body) + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 64
        limit = self.conn.max_payload
        if size > limit:
            raise MessageTooLargeError(
                f"task {message.task!r} id {message.id}: message is {size} bytes with "
                f"headers, over the NATS server's max_payload of {limit} bytes")

    async def consume(self, queues: Sequence[str], prefetch: int) -> AsyncIterator[Delivery]:
        await self.declare(queues)
        consumption = _Consumption(self, queues, prefetch)
        self._consumptions.add(consumption)
        await consumption.start()
        try:
            while True:
                await consumption.slots.acquire()
                try:
                    delivery = await consumption.ready.get()
                except BaseException:
                    consumption.slots.release()
                    raise
                delivery.yielded = True
                yield delivery
        finally:
            self._consumptions.discard(consumption)
            await consumption.stop()

    async def publish_dead(self, msg: Msg, queue: str, reason: str) -> None:
        """Store ``msg`` byte for byte in the dead-letter stream, reason in headers."""
        meta = msg.metadata
        headers = {
            MSG_ID: f"dead:{meta.stream}:{meta.sequence.stream}",
            DEAD_SUBJECT: msg.subject,
            DEAD_QUEUE: queue,
            DEAD_DELIVERED: str(meta.num_delivered),
            DEAD_AT: repr(time.time()),
        }
        room = self.conn.max_payload - len(msg.data) - 512
        headers[DEAD_REASON] = " ".join(reason.split())[:max(0, min(_MAX_REASON, room))]
        conn = self.conn
        await conn.retry(
            f"dead-letter {meta.stream}:{meta.sequence.stream}",
            lambda: conn.publish(f"{self.prefix}.dead.{token(queue)}", msg.data,
                                 headers=headers, stream=self.dead_stream))

    # -- control (cancel requests) ---------------------------------------------------

    @property
    def control_subject(self) -> str:
        return f"{self.prefix}.control"

    async def broadcast(self, body: bytes) -> None:
        """A core publish (workers listening now get it; nothing stores it), flushed
        with a PING so that the server has it when this returns."""
        await self.start()
        await self.conn.nc.publish(self.control_subject, body)
        await self.conn.barrier()

    async def control(self) -> AsyncIterator[bytes]:
        await self.start()
        received: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_msg(msg: Msg) -> None:
            received.put_nowait(msg.data)

        return _control(received, await self.conn.subscribe(self.control_subject, on_msg))

    # -- operations (qtasks inspect / dead) ------------------------------------------

    async def inspect(self, queues: Sequence[str]) -> list[QueueStats]:
        """Ready and in-flight counts from each queue's shared consumer. JetStream does
        not know how many workers share a pull consumer, so ``consumers`` stays unknown."""
        await self.declare(queues)
        stats = []
        for queue in queues:
            info = await self.conn.js.consumer_info(self.stream, self.consumer(queue))
            stats.append(QueueStats(queue, int(info.num_pending or 0),
                                    int(info.num_ack_pending or 0)))
        return stats

    async def _dead(self, limit: int) -> list[tuple[int, DeadLetter]]:
        await self.start()
        found: list[tuple[int, DeadLetter]] = []
        seq = 1
        while len(found) < limit:
            try:
                msg = await self.conn.js.get_msg(self.dead_stream, seq=seq, next=True,
                                                 subject=f"{self.prefix}.dead.>")
            except NotFoundError:
                break
            headers = msg.headers or {}
            number_ = int(msg.seq or seq)
            found.append((number_, DeadLetter(
                ref=str(number_), queue=headers.get(DEAD_QUEUE, ""), body=msg.data or b"",
                reason=headers.get(DEAD_REASON, ""), at=_float(headers.get(DEAD_AT)))))
            seq = number_ + 1
        return found

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return [letter for _, letter in await self._dead(limit)]

    async def requeue_dead(self, refs: Sequence[str] | None = None) -> int:
        """Publish each chosen dead letter back to its queue (acknowledged), then delete
        it from the dead-letter stream: a crash in between duplicates, never loses."""
        wanted = None if refs is None else set(refs)
        count = 0
        for seq, letter in await self._dead(limit=1_000_000):
            if wanted is not None and letter.ref not in wanted:
                continue
            subject = self.subject(letter.queue or "default")
            headers = {MSG_ID: f"requeued:{self.dead_stream}:{seq}"}
            await self.conn.publish(subject, letter.body, headers=headers, stream=self.stream)
            await self.conn.js.delete_msg(self.dead_stream, seq)
            count += 1
        return count

    async def purge_dead(self) -> int:
        await self.start()
        info = await self.conn.js.stream_info(self.dead_stream)
        await self.conn.js.purge_stream(self.dead_stream)
        return int(info.state.messages or 0)


async def _control(received: asyncio.Queue[bytes], sub: Subscription) -> AsyncIterator[bytes]:
    try:
        while True:
            yield await received.get()
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
