"""The RabbitMQ broker (tasks in), on aio-pika.

Topology, every name under the URL's ``prefix`` (``docs/rabbitmq.md`` has the full table):

- ``{prefix}.tasks``, a direct exchange; the routing key is the QTasks queue name.
- ``{prefix}.q.{queue}``, one durable queue per QTasks queue, bound with its name. Classic
  queues carry ``x-max-priority``; quorum queues (``queue_type=quorum``) are replicated
  but have no priorities on RabbitMQ 3.10, so the app refuses priorities for them.
- ``{prefix}.delay.{queue}.{ms}``, delay queues: a message waits ``ms`` there (the queue's
  ``x-message-ttl``), then is dead-lettered into ``{prefix}.tasks`` with its queue's name.
  One queue per rounded delay, so nothing waits behind a longer delay; ``x-expires``
  removes idle ones. No plugin.
- ``{prefix}.dlx`` (fanout) into ``{prefix}.dead``: messages the worker gives up on, byte
  for byte, with ``x-qtasks-reason`` and ``x-qtasks-queue`` headers.

Tasks are published persistent, ``mandatory`` and with publisher confirms: ``publish``
returns once RabbitMQ has taken the message, and an unroutable one is an error. Workers
consume with manual acks and ``basic.qos`` equal to their concurrency, or to the
``prefetch`` option when it is set (they still run at most their concurrency at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any

from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelClosed, ChannelInvalidStateError, PublishError
from aiormq import spec
from aiormq.abc import AbstractChannel, DeliveredMessage

from qtasks.brokers.rabbitmq import control as rabbitmq_control
from qtasks.brokers.rabbitmq.connection import (
    DELAY_QUEUE_IDLE_MS,
    DELAY_REDECLARE_S,
    AmqpSettings,
    connect,
    connection_name,
    delay_bucket_ms,
    quietly,
    raise_if_refused,
    retrying,
    send,
)
from qtasks.errors import QTasksError
from qtasks.interfaces import Broker, DeadLetter, Delivery, QueueStats
from qtasks.protocol import TaskMessage

log = logging.getLogger("qtasks.rabbitmq")

#: How many times a classic-queue message was handed out before (quorum queues count in
#: ``x-delivery-count`` themselves).
REDELIVERIES = "x-qtasks-redeliveries"
REASON = "x-qtasks-reason"
ORIGIN = "x-qtasks-queue"
#: Headers RabbitMQ or this backend manages; stripped when a message is copied elsewhere.
_MANAGED = {"x-death", "x-first-death-exchange", "x-first-death-queue",
            "x-first-death-reason", "x-delivery-count"}


def _copy(properties: spec.Basic.Properties, **headers: Any) -> spec.Basic.Properties:
    """The same properties (body unchanged), for moving a message to another queue."""
    kept = {k: v for k, v in (properties.headers or {}).items() if k not in _MANAGED}
    kept.update(headers)
    return spec.Basic.Properties(
        headers=kept, content_type=properties.content_type,
        content_encoding=properties.content_encoding, delivery_mode=2,
        priority=properties.priority, correlation_id=properties.correlation_id,
        reply_to=properties.reply_to, message_id=properties.message_id,
        timestamp=properties.timestamp, message_type=properties.message_type,
        app_id=properties.app_id,
    )


def _tag(message: DeliveredMessage) -> int:
    return message.delivery.delivery_tag or 0  # type: ignore[union-attr]  # a Deliver


def _header_int(properties: spec.Basic.Properties, name: str) -> int:
    try:
        return int((properties.headers or {}).get(name) or 0)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


class _Acks:
    """Settlements of the deliveries of one (aiormq) channel, acks batched.

    An ack is not sent at once: the acks of one event-loop iteration go out together, as
    one ``basic.ack`` with ``multiple`` for the longest run of settled deliveries from the
    oldest outstanding one, plus one plain ``basic.ack`` for each settled delivery behind
    one that is still running (so a long task never holds the acks of quick ones, which
    would count against the prefetch). A delivery leaves ``outstanding`` only once its
    settlement is written, so a ``multiple`` ack never covers a delivery whose task has
    not finished or whose requeue or reject is not yet on the wire.
    """

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        #: Delivery tags received and not yet settled on the wire.
        self.outstanding: set[int] = set()
        #: Of those, the ones to ack.
        self.done: set[int] = set()
        self.sending: asyncio.Future[None] | None = None

    def check(self) -> None:
        """Raise if the channel died: its delivery tags mean nothing on the next one."""
        if self.channel.is_closed:
            raise ChannelInvalidStateError(f"{self.channel!r} closed")

    def ack(self, tag: int) -> None:
        self.check()
        self.done.add(tag)
        if self.sending is None:
            # Runs on the next loop iteration: what other tasks ack meanwhile joins it.
            self.sending = asyncio.ensure_future(self._send())

    async def settle(self, tag: int, requeue: bool, reject: bool = False) -> None:
        """Requeue or reject (to RabbitMQ's dead-lettering) one delivery, written at once."""
        self.check()
        if reject:
            await self.channel.basic_reject(tag, requeue=requeue)
        else:
            await self.channel.basic_nack(tag, requeue=requeue)
        self.outstanding.discard(tag)

    def _batch(self) -> list[tuple[int, bool]]:
        """(tag, multiple) acks for everything in ``done``, which is then forgotten."""
        running = self.outstanding - self.done
        first_running = min(running) if running else None
        run = [t for t in self.done if first_running is None or t < first_running]
        acks = [(max(run), True)] if run else []
        acks += [(t, False) for t in sorted(self.done.difference(run))]
        self.outstanding -= self.done
        self.done.clear()
        return acks

    async def _send(self) -> None:
        try:
            while acks := self._batch():
                last = len(acks) - 1
                for index, (tag, multiple) in enumerate(acks):
                    # One write queue, in order: waiting for the last one is waiting for all.
                    await self.channel.basic_ack(tag, multiple=multiple, wait=index == last)
        except Exception as exc:
            log.warning("could not ack task messages (%s: %s); RabbitMQ will hand them out "
                        "again", type(exc).__name__, exc)
        finally:
            self.sending = None

    async def flush(self) -> None:
        """Wait until every ack made so far is written."""
        while self.sending is not None:
            await asyncio.shield(self.sending)


class RabbitMQDelivery(Delivery):
    """A task message on loan from a work queue until one settlement.

    A settlement that fails because the channel died in the meantime is logged and
    dropped: RabbitMQ has already put the message back for another worker, and the
    delivery tag means nothing on the new channel.
    """

    def __init__(self, broker: RabbitMQBroker, queue: str, message: DeliveredMessage,
                 acks: _Acks, redelivered: bool, on_settled: Callable[[], None],
                 received: float | None = None) -> None:
        self.body = message.body
        self.redelivered = redelivered
        self.queue = queue
        self.message = message
        self.properties: spec.Basic.Properties = message.header.properties
        self._tag = _tag(message)
        self._acks = acks
        self._broker = broker
        self._on_settled = on_settled
        #: When RabbitMQ's ``consumer_timeout`` clock started: on arrival, which may be
        #: well before the hand-out when ``prefetch`` buffers deliveries ahead.
        self._received = time.monotonic() if received is None else received
        self._settled = False
        self._warned = False

    async def ack(self) -> None:
        await self._settle("ack", self._ack)

    async def _ack(self) -> None:
        self._acks.ack(self._tag)

    async def requeue(self) -> None:
        await self._settle("requeue", self._nack)

    async def _nack(self) -> None:
        """Back to the queue at once; also every fallback that must not lose the message
        (called inside ``_settle``, so it cannot go through ``requeue``)."""
        await self._acks.settle(self._tag, requeue=True)

    async def retry_later(self, delay: float) -> None:
        async def move() -> None:
            # Rounded up: this must never come back early (3 digits: at most 1 % late).
            ttl = delay_bucket_ms(delay, digits=3, up=True)
            await self._broker.publish_delayed(self.queue, ttl, self.body,
                                               _copy(self.properties))
            self._acks.ack(self._tag)

        await self._settle("delay", move, fallback=self._nack)

    async def dead_letter(self, reason: str) -> None:
        async def move() -> None:
            await self._broker.publish_dead(self.queue, self.body, _copy(
                self.properties, **{REASON: reason[:4000], ORIGIN: self.queue,
                                    "x-qtasks-dead-at": int(time.time())}))
            self._acks.ack(self._tag)

        # If the copy cannot be published, RabbitMQ's own dead-lettering still keeps the
        # message (with an x-death header instead of our reason).
        await self._settle("dead-letter", move, fallback=lambda: self._acks.settle(
            self._tag, requeue=False, reject=True))

    @property
    def lost(self) -> bool:
        return bool(self._acks.channel.is_closed)

    async def let_go(self) -> None:
        await self._settle("let go of", _nothing)  # its channel is gone: nothing to send

    async def keep_alive(self) -> None:
        """RabbitMQ leases a delivery for as long as the channel lives, except that 3.10
        closes a channel holding a delivery longer than its ``consumer_timeout`` (which a
        client cannot extend): say so before it happens, once. Counted from the arrival,
        as the server counts, so time spent waiting in the ``prefetch`` buffer is in it."""
        held = time.monotonic() - self._received
        limit = self._broker.settings.consumer_timeout
        if not self._warned and not self._settled and held > 0.8 * limit:
            self._warned = True
            log.warning(
                "task message %s has been held %.1f s unacked; RabbitMQ closes the channel "
                "at its consumer_timeout (%.1f s) and hands the task to another worker: raise "
                "consumer_timeout in rabbitmq.conf (see docs/rabbitmq.md)",
                self.properties.message_id, held, limit)

    async def _settle(self, what: str, operation: Callable[[], Awaitable[Any]],
                      fallback: Callable[[], Awaitable[Any]] | None = None) -> None:
        if self._settled:
            return
        self._settled = True
        try:
            try:
                await operation()
            except Exception as exc:
                if fallback is None or self._acks.channel.is_closed:
                    raise
                log.warning("could not %s task message %s (%s); falling back", what,
                            self.properties.message_id, exc)
                await fallback()
        except Exception as exc:
            log.warning("could not %s task message %s from %s (%s: %s); RabbitMQ will hand "
                        "it out again", what, self.properties.message_id, self.queue,
                        type(exc).__name__, exc)
        finally:
            self._on_settled()


class _Consumer:
    """One ``consume()`` call: its channel and QoS, a consumer per queue, the messages
    received but not yet handed out, and how many handed out are still unsettled.

    It consumes with aiormq directly: aio-pika's message wrapper costs more than the rest
    of receiving a task. So the consumers are not restored by aio-pika: ``_subscribe``
    runs again when the robust channel reopens (QoS and queues are restored by it).
    """

    def __init__(self, broker: RabbitMQBroker, queues: Sequence[str], prefetch: int) -> None:
        self.broker = broker
        self.queues = list(queues)
        #: The ``basic.qos`` count: the ``prefetch`` option when set (what RabbitMQ may
        #: hand out ahead of the acks, as a Celery user means by prefetch), else the
        #: ``prefetch`` of this call (the worker's concurrency).
        self.prefetch = max(1, min(broker.settings.prefetch or prefetch, 65535))
        #: (queue, message, its channel's settlements, monotonic time of arrival).
        self.inbox: asyncio.Queue[tuple[str, DeliveredMessage, _Acks, float] | None] = \
            asyncio.Queue()
        # The client-side bound on deliveries handed out and unsettled: never more than
        # this call's ``prefetch`` (the worker's concurrency relies on it), whatever
        # RabbitMQ sends ahead (a larger ``prefetch`` option, or several quorum queues,
        # which RabbitMQ can only limit per consumer); the rest waits unacked in ``inbox``.
        self.slots = asyncio.Semaphore(max(1, min(prefetch, self.prefetch)))
        self.unsettled = 0
        self.stopped = False
        self.closed = False
        self.channel: AbstractRobustChannel | None = None
        #: The settlements of the current underlying channel, and its consumer tags.
        self.acks: _Acks | None = None
        self.tags: list[str] = []
        self.closing: asyncio.Future[None] | None = None
        #: Channel closes under way after a consumer cancel (held so they run to the end).
        self._reopening: set[asyncio.Future[None]] = set()

    async def open(self, connection: AbstractRobustConnection) -> None:
        settings = self.broker.settings
        self.channel = channel = await connection.channel()
        channel.close_callbacks.add(self._on_close)
        channel.reopen_callbacks.add(self._on_reopen)
        # Per consumer by default; per channel (exact for several queues) where the queue
        # type allows it (quorum queues refuse a global QoS).
        shared = len(self.queues) > 1 and settings.queue_type == "classic"
        await channel.set_qos(prefetch_count=self.prefetch, global_=shared)
        for name in self.queues:
            await channel.declare_queue(settings.work_queue(name), durable=True,
                                        arguments=settings.work_queue_arguments())
        await self._subscribe()

    async def _subscribe(self) -> None:
        assert self.channel is not None
        underlay = await self.channel.get_underlay_channel()
        acks = _Acks(underlay)
        self.acks, self.tags = acks, []
        underlay.on_consumer_cancel_callbacks.add(self._on_cancel)
        for name in self.queues:
            ok = await underlay.basic_consume(self.broker.settings.work_queue(name),
                                              self._receiver(name, acks))
            self.tags.append(ok.consumer_tag or "")

    async def _on_reopen(self, _channel: object) -> None:
        if self.stopped:
            return
        try:
            await self._subscribe()
        except Exception as exc:
            log.warning("could not consume again after the channel reopened (%s: %s); "
                        "retrying on the next reconnect", type(exc).__name__, exc)

    def _on_cancel(self, _frame: object) -> None:
        """RabbitMQ cancelled a consumer (its queue was deleted, or a quorum queue lost
        its leader): closing the channel makes the robust channel reopen it, which declares
        the queues again and calls ``_subscribe`` (unacked deliveries are redelivered)."""
        if not self.stopped and self.acks is not None:
            log.warning("RabbitMQ cancelled the task consumer; consuming again")
            # Not awaited here: this runs in the channel's reader, which the close needs.
            closing = asyncio.ensure_future(quietly(self.acks.channel.close()))
            self._reopening.add(closing)
            closing.add_done_callback(self._reopening.discard)

    def _receiver(self, name: str, acks: _Acks,
                  ) -> Callable[[DeliveredMessage], Coroutine[Any, Any, None]]:
        async def receive(message: DeliveredMessage) -> None:
            acks.outstanding.add(_tag(message))
            if self.stopped:
                await quietly(acks.settle(_tag(message), requeue=True))
                return
            self.inbox.put_nowait((name, message, acks, time.monotonic()))

        return receive

    def _on_close(self, _channel: object, exc: BaseException | None) -> None:
        if self.stopped or exc is None or isinstance(exc, asyncio.CancelledError):
            return
        text = str(exc)
        if "acknowledgement" in text and "timed out" in text:
            log.error("RabbitMQ closed the worker channel: a task ran past the server's "
                      "consumer_timeout; its unacked tasks go to other workers (set "
                      "consumer_timeout in rabbitmq.conf, see docs/rabbitmq.md): %s", text)
        else:
            log.warning("consumer channel closed (%s: %s); resuming after reconnect",
                        type(exc).__name__, text)

    async def next(self) -> RabbitMQDelivery | None:
        while True:
            item = await self.inbox.get()
            if item is None:
                return None  # the broker was closed
            name, message, acks, received = item
            if acks.channel.is_closed:
                continue  # its channel died: RabbitMQ has put it back already
            delivery = await self._admit(name, message, acks, received)
            if delivery is not None:
                return delivery

    async def _admit(self, name: str, message: DeliveredMessage, acks: _Acks,
                     received: float) -> RabbitMQDelivery | None:
        """The delivery to hand out, or None when a redelivered classic-queue message was
        counted (re-published with its count) or is over ``delivery_limit``.

        Classic queues say only *that* a message was delivered before, not how often, so
        a redelivered message is re-published with ``x-qtasks-redeliveries`` + 1 and the
        original acked: a task that kills every worker it reaches is dead-lettered after
        ``delivery_limit`` runs instead of circulating forever.
        """
        settings = self.broker.settings
        properties = message.header.properties
        count = _header_int(properties, REDELIVERIES)
        redelivered = bool(message.redelivered)
        if settings.queue_type == "quorum" or not redelivered:
            return RabbitMQDelivery(self.broker, name, message, acks,
                                    redelivered or count > 0, self._settled, received)
        internal = RabbitMQDelivery(self.broker, name, message, acks, True, lambda: None)
        if count + 1 >= settings.delivery_limit:
            log.error("dead-lettering task message %s: delivered %d times (delivery_limit)",
                      properties.message_id, count + 1)
            await internal.dead_letter(
                f"redelivery limit: delivered {count + 1} times without being settled "
                f"(delivery_limit={settings.delivery_limit})")
            return None

        async def count_it() -> None:
            await self.broker.publish_raw(settings.tasks_exchange, name, message.body,
                                          _copy(properties, **{REDELIVERIES: count + 1}))
            await internal._ack()

        await internal._settle("count the redelivery of", count_it, fallback=internal._nack)
        return None

    def _settled(self) -> None:
        self.unsettled -= 1
        self.slots.release()
        if self.stopped and self.unsettled == 0:
            self.closing = asyncio.ensure_future(self._close_channel())

    async def stop(self) -> None:
        """Stop consuming; what was received but not handed out goes back at once. The
        channel stays open until every delivery handed out is settled."""
        self.stopped = True
        if not self.closed and self.acks is not None:
            for tag in self.tags:
                await quietly(self.acks.channel.basic_cancel(tag))
        while not self.inbox.empty():
            item = self.inbox.get_nowait()
            if item is not None:
                _, message, acks, _ = item
                await quietly(acks.settle(_tag(message), requeue=True))
        if self.unsettled == 0:
            await self._close_channel()

    async def flush(self) -> None:
        """Write the acks not written yet (before the channel or connection closes)."""
        if self.acks is not None:
            await quietly(self.acks.flush())

    def close_now(self) -> None:
        """The broker is closing: end the ``consume()`` iterator wherever it waits."""
        self.closed = True
        self.inbox.put_nowait(None)
        self.slots.release()

    async def _close_channel(self) -> None:
        channel, self.channel = self.channel, None
        self.broker.consumers.discard(self)
        if channel is not None and not channel.is_closed and not self.closed:
            await self.flush()
            await quietly(channel.close())


class RabbitMQBroker(Broker):
    """Tasks over RabbitMQ. ``RabbitMQBroker("amqp://user:pass@host/vhost?prefix=app")``;
    options in the URL query or as keywords (see ``connection.AmqpSettings``)."""

    #: The worker calls ``keep_alive`` this often; here only to warn before RabbitMQ's
    #: ``consumer_timeout`` (the lease itself lasts as long as the channel).
    lease_interval = 60.0
    #: RabbitMQ's default ``max_message_size`` (128 MiB).
    max_message_size = 128 * 1024 * 1024

    def __init__(self, url: str = "amqp://guest:guest@localhost/", **options: Any) -> None:
        self.settings = AmqpSettings.parse(url, options)
        self.url = self.settings.display_url
        #: As RabbitMQ lists the connection (``rabbitmqctl list_connections``).
        self.connection_name = connection_name(self.settings, "broker")
        if self.settings.queue_type == "quorum" or not self.settings.max_priority:
            # Quorum queues on RabbitMQ 3.10 ignore priorities (and max_priority=0 turns
            # them off): the app then refuses them up front instead of ignoring them.
            self.supports_priority = False
        self.max_priority = self.settings.max_priority
        self.consumers: set[_Consumer] = set()
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._admin: AbstractRobustChannel | None = None
        self._declared: set[str] = set()
        self._delay_declared: dict[str, float] = {}
        self._lock = asyncio.Lock()
        #: How often the connection was re-established (for logs, metrics and tests).
        self.reconnects = 0

    def __repr__(self) -> str:
        return f"<RabbitMQBroker {self.url} prefix={self.settings.prefix}>"

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._connection is not None:
            return
        async with self._lock:
            if self._connection is not None:
                return
            settings = self.settings
            connection = await connect(settings, self.connection_name)
            try:
                # Returns raise PublishError: an unroutable task is an error, not lost.
                publisher = await connection.channel(on_return_raises=True)
                admin = await connection.channel()
                await admin.declare_exchange(settings.tasks_exchange, "direct", durable=True)
                dlx = await admin.declare_exchange(settings.dead_exchange, "fanout",
                                                   durable=True)
                dead = await admin.declare_queue(settings.dead_queue, durable=True,
                                                 arguments=settings.dead_queue_arguments())
                await dead.bind(dlx, "")
            except BaseException as exc:
                await connection.close()
                raise_if_refused(exc, settings)
                raise
            self._publisher = publisher
            self._admin = admin
            connection.reconnect_callbacks.add(self._on_reconnect)
            self._connection = connection

    def _on_reconnect(self, _connection: object) -> None:
        self.reconnects += 1
        # A broker restarted without its durable queues (a new node) needs them again.
        self._declared.clear()
        self._delay_declared.clear()
        log.info("reconnected to %s (%d reconnects)", self.url, self.reconnects)

    async def close(self) -> None:
        for consumer in list(self.consumers):
            await consumer.flush()  # the acks made so far, before the connection goes
            consumer.close_now()
        connection, self._connection = self._connection, None
        self._declared.clear()
        self._delay_declared.clear()
        if connection is not None:
            await connection.close()

    # -- declaring ---------------------------------------------------------------------

    async def declare(self, queues: Sequence[str]) -> None:
        await self.start()
        for queue in queues:
            await self._ensure_queue(queue)

    async def _ensure_queue(self, queue: str, force: bool = False) -> None:
        name = self.settings.work_queue(queue)
        if name in self._declared and not force:
            return
        async with self._lock:
            if name in self._declared and not force:
                return
            try:
                declared = await self._admin_channel().declare_queue(
                    name, durable=True, arguments=self.settings.work_queue_arguments(),
                    robust=False)
                await declared.bind(self.settings.tasks_exchange, queue, robust=False)
            except ChannelClosed as exc:
                raise_if_refused(exc, self.settings)
                raise
            self._declared.add(name)

    async def _ensure_delay_queue(self, queue: str, ttl_ms: int, force: bool = False) -> str:
        name = self.settings.delay_queue(queue, ttl_ms)
        now = time.monotonic()
        if not force and now - self._delay_declared.get(name, -1e9) < DELAY_REDECLARE_S:
            return name
        await self._admin_channel().declare_queue(
            name, durable=True, arguments=self.settings.delay_queue_arguments(queue, ttl_ms),
            robust=False)
        self._delay_declared[name] = now
        if len(self._delay_declared) > 1000:  # forget queues that have expired by now
            horizon = now - DELAY_QUEUE_IDLE_MS / 1000.0
            self._delay_declared = {k: t for k, t in self._delay_declared.items()
                                    if t > horizon}
        return name

    def _admin_channel(self) -> AbstractRobustChannel:
        if self._admin is None:
            raise QTasksError("RabbitMQBroker is not started (call start())")
        return self._admin

    # -- publishing --------------------------------------------------------------------

    async def publish(self, message: TaskMessage, body: bytes) -> None:
        await self.start()
        await self._ensure_queue(message.queue)
        priority = min(max(message.priority, 0), self.settings.max_priority)
        properties = spec.Basic.Properties(
            delivery_mode=2, content_type="application/json", message_id=message.id,
            message_type="task", app_id="qtasks",
            priority=priority if priority and self.supports_priority else None,
            headers={"x-qtasks-task": message.task, "x-qtasks-attempt": message.attempt},
        )
        delay = message.not_before - time.time() if message.not_before is not None else 0.0
        if delay >= 0.001:
            # Rounded down: at most 10 % early, and the worker sends an early message
            # back with the time left (retry_later), which rounds up.
            await self.publish_delayed(message.queue, delay_bucket_ms(delay, 2, up=False),
                                       body, properties)
        else:
            await self.publish_raw(self.settings.tasks_exchange, message.queue, body,
                                   properties)

    async def publish_delayed(self, queue: str, ttl_ms: int, body: bytes,
                              properties: spec.Basic.Properties) -> None:
        await self.start()
        await self._ensure_queue(queue)
        name = await self._ensure_delay_queue(queue, ttl_ms)
        await self.publish_raw("", name, body, properties,
                               redeclare=lambda: self._ensure_delay_queue(queue, ttl_ms, True))

    async def publish_dead(self, queue: str, body: bytes,
                           properties: spec.Basic.Properties) -> None:
        await self.publish_raw(self.settings.dead_exchange, queue, body, properties)

    async def publish_raw(self, exchange: str, routing_key: str, body: bytes,
                          properties: spec.Basic.Properties,
                          redeclare: Callable[[], Awaitable[Any]] | None = None) -> None:
        """Publish, mandatory and confirmed, through reconnects. Returned as unroutable
        once (a queue deleted, or a delay queue expired, since we declared it): declare
        again and retry; returned twice: an error."""
        if redeclare is None and exchange == self.settings.tasks_exchange:
            async def redeclare_work_queue() -> None:
                await self._ensure_queue(routing_key, force=True)
            redeclare = redeclare_work_queue

        async def attempt() -> None:
            channel = self._publisher
            if channel is None:
                raise QTasksError("RabbitMQBroker is closed")
            timeout = self.settings.publish_timeout
            try:
                await send(channel, exchange, routing_key, body, properties, True, timeout)
            except PublishError:
                if redeclare is None:
                    raise
                await redeclare()
                await send(channel, exchange, routing_key, body, properties, True, timeout)

        await self.start()
        try:
            await retrying(self.settings, f"publishing task {properties.message_id}", attempt)
        except PublishError as exc:
            raise QTasksError(
                f"RabbitMQ returned task {properties.message_id} as unroutable "
                f"(exchange {exchange!r}, routing key {routing_key!r})") from exc

    # -- consuming ---------------------------------------------------------------------

    async def consume(self, queues: Sequence[str], prefetch: int) -> AsyncIterator[Delivery]:
        await self.declare(queues)
        assert self._connection is not None
        consumer = _Consumer(self, queues, prefetch)
        self.consumers.add(consumer)
        try:
            await consumer.open(self._connection)
            while True:
                await consumer.slots.acquire()
                if consumer.closed:
                    return
                try:
                    delivery = await consumer.next()
                except BaseException:
                    consumer.slots.release()
                    raise
                if delivery is None:
                    return
                consumer.unsettled += 1
                yield delivery
        finally:
            await consumer.stop()

    # -- control (cancel requests): brokers/rabbitmq_control.py --------------------------

    async def broadcast(self, body: bytes) -> None:
        await self.start()
        assert self._connection is not None
        await rabbitmq_control.broadcast(self._connection, self.settings, body)

    async def control(self) -> AsyncIterator[bytes]:
        await self.start()
        assert self._connection is not None
        return await rabbitmq_control.subscribe(self._connection, self.settings)

    # -- operations (qtasks inspect / dead) ----------------------------------------------

    async def inspect(self, queues: Sequence[str]) -> list[QueueStats]:
        await self.start()
        assert self._connection is not None
        stats = []
        for queue in queues:
            async with self._connection.channel() as channel:
                try:
                    declared = await channel.declare_queue(
                        self.settings.work_queue(queue), passive=True, robust=False)
                except ChannelClosed:
                    stats.append(QueueStats(queue, 0, None, 0))
                    continue
                result = declared.declaration_result
                stats.append(QueueStats(queue, result.message_count or 0, None,
                                        result.consumer_count or 0))
        return stats

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Read with basic.get and never acked: closing the channel puts them all back."""
        found: list[DeadLetter] = []
        async with self._dead_channel() as queue:
            while len(found) < limit:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                found.append(_dead_letter(message))
        return found

    async def requeue_dead(self, refs: Sequence[str] | None = None) -> int:
        wanted = set(refs) if refs is not None else None
        moved = 0
        async with self._dead_channel() as queue:
            total = queue.declaration_result.message_count or 0
            for _ in range(total):
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                letter = _dead_letter(message)
                if wanted is not None and letter.ref not in wanted:
                    continue  # left unacked: back in the dead queue when the channel closes
                copy = _copy(message.properties)
                headers = copy.headers or {}
                for name in list(headers):
                    if name.startswith("x-qtasks-") and name not in ("x-qtasks-task",
                                                                     "x-qtasks-attempt"):
                        del headers[name]
                await self._ensure_queue(letter.queue)
                await self.publish_raw(self.settings.tasks_exchange, letter.queue,
                                       message.body, copy)
                await message.ack()
                moved += 1
        return moved

    async def purge_dead(self) -> int:
        async with self._dead_channel() as queue:
            result = await queue.purge()
            return int(result.message_count or 0)

    @contextlib.asynccontextmanager
    async def _dead_channel(self) -> AsyncIterator[AbstractQueue]:
        await self.start()
        assert self._connection is not None
        async with self._connection.channel() as channel:
            yield await channel.declare_queue(
                self.settings.dead_queue, durable=True,
                arguments=self.settings.dead_queue_arguments(), robust=False)


def _dead_letter(message: AbstractIncomingMessage) -> DeadLetter:
    headers = message.headers or {}
    reason, queue = headers.get(REASON), headers.get(ORIGIN)
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        death = deaths[0]  # RabbitMQ's own dead-lettering (quorum delivery limit, reject)
        reason = reason or f"RabbitMQ: {_text(death.get('reason'))}"
        keys = death.get("routing-keys")
        queue = queue or (keys[0] if isinstance(keys, list) and keys else None)
    ref = message.message_id or f"sha1:{hashlib.sha1(message.body).hexdigest()[:16]}"
    dead_at = headers.get("x-qtasks-dead-at")
    at = float(dead_at) if isinstance(dead_at, int | float) else None
    if at is None and isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        when = deaths[0].get("time")
        at = when.timestamp() if isinstance(when, datetime) else None
    return DeadLetter(ref=str(ref), queue=_text(queue or message.routing_key or "default"),
                      body=message.body, reason=_text(reason or "unknown"), at=at)


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


async def _nothing() -> None:
    return None
