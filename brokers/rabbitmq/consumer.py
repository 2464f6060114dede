"""Consuming task messages: one ``TaskConsumer`` per ``consume()`` call of a worker.

Workers consume with manual acks and ``basic.qos`` equal to their concurrency, or to the
``prefetch`` option when it is set (they still run at most their concurrency at once).
A classic queue says only *that* a message was delivered before, so the consumer counts
redeliveries itself and dead-letters a message past ``delivery_limit``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import DeliveredMessage

from qtasks.brokers.rabbitmq.connection import quietly
from qtasks.brokers.rabbitmq.delivery import (
    ChannelAcks,
    RabbitMQDelivery,
    delivery_tag,
    header_int,
)
from qtasks.brokers.rabbitmq.topology import REDELIVERIES, TaskPublisher
from qtasks.interfaces import DeadLetterReason, Delivery

log = logging.getLogger(__name__)


class TaskConsumers:
    """The consumers of one broker: each ``consume()`` call makes one, and the broker's
    ``close`` writes their pending acks and ends them."""

    def __init__(self, publisher: TaskPublisher) -> None:
        self.publisher = publisher
        self.active: set[TaskConsumer] = set()

    async def consume(
        self, queues: Sequence[str], prefetch: int,
        on_dead_letter: Callable[[str, DeadLetterReason, str], None] | None = None,
    ) -> AsyncIterator[Delivery]:
        publisher = self.publisher
        await publisher.connection.start()
        for queue in queues:
            await publisher.ensure_queue(queue)
        consumer = TaskConsumer(publisher, self.active, queues, prefetch)
        consumer.on_dead_letter = on_dead_letter
        self.active.add(consumer)
        try:
            await consumer.open(publisher.connection.live)
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

    async def close(self) -> None:
        for consumer in list(self.active):
            await consumer.flush()  # the acks made so far, before the connection goes
            consumer.close_now()


class TaskConsumer:
    """One ``consume()`` call: its channel and QoS, a consumer per queue, the messages
    received but not yet handed out, and how many handed out are still unsettled.

    It consumes with aiormq directly: aio-pika's message wrapper costs more than the rest
    of receiving a task. So the consumers are not restored by aio-pika: ``_subscribe``
    runs again when the robust channel reopens (QoS and queues are restored by it).
    """

    def __init__(self, publisher: TaskPublisher, active: set[TaskConsumer],
                 queues: Sequence[str], prefetch: int) -> None:
        self.publisher = publisher
        self.settings = settings = publisher.settings
        #: The broker's consumers, which this one leaves once its channel is closed.
        self._active = active
        self.queues = list(queues)
        #: The ``basic.qos`` count: the ``prefetch`` option when set (what RabbitMQ may
        #: hand out ahead of the acks, as a Celery user means by prefetch), else the
        #: ``prefetch`` of this call (the worker's concurrency).
        self.prefetch = max(1, min(settings.prefetch or prefetch, 65535))
        #: (queue, message, its channel's settlements, monotonic time of arrival).
        self.inbox: asyncio.Queue[tuple[str, DeliveredMessage, ChannelAcks, float] | None] = \
            asyncio.Queue()
        # The client-side bound on deliveries handed out and unsettled: never more than
        # this call's ``prefetch`` (the worker's concurrency relies on it), whatever
        # RabbitMQ sends ahead (a larger ``prefetch`` option, or several quorum queues,
        # which RabbitMQ can only limit per consumer); the rest waits unacked in ``inbox``.
        self.slots = asyncio.Semaphore(max(1, min(prefetch, self.prefetch)))
        self.unsettled = 0
        #: Told of each message this consumer dead-letters on its own (``Broker``).
        self.on_dead_letter: Callable[[str, DeadLetterReason, str], None] | None = None
        self.stopped = False
        self.closed = False
        self.channel: AbstractRobustChannel | None = None
        #: The settlements of the current underlying channel, and its consumer tags.
        self.acks: ChannelAcks | None = None
        self.tags: list[str] = []
        self.closing: asyncio.Future[None] | None = None
        #: Channel closes under way after a consumer cancel (held so they run to the end).
        self._reopening: set[asyncio.Future[None]] = set()

    async def open(self, connection: AbstractRobustConnection) -> None:
        settings = self.settings
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
        acks = ChannelAcks(underlay)
        self.acks, self.tags = acks, []
        underlay.on_consumer_cancel_callbacks.add(self._on_cancel)
        for name in self.queues:
            ok = await underlay.basic_consume(self.settings.work_queue(name),
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

    def _receiver(self, name: str, acks: ChannelAcks,
                  ) -> Callable[[DeliveredMessage], Coroutine[Any, Any, None]]:
        async def receive(message: DeliveredMessage) -> None:
            acks.outstanding.add(delivery_tag(message))
            if self.stopped:
                await quietly(acks.settle(delivery_tag(message), requeue=True))
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

    async def _admit(self, name: str, message: DeliveredMessage, acks: ChannelAcks,
                     received: float) -> RabbitMQDelivery | None:
        """The delivery to hand out, or None when a redelivered classic-queue message was
        counted (re-published with its count) or is over ``delivery_limit``.

        Classic queues say only *that* a message was delivered before, not how often, so
        a redelivered message is re-published with ``x-qtasks-redeliveries`` + 1 and the
        original acked: a task that kills every worker it reaches is dead-lettered after
        ``delivery_limit`` runs instead of circulating forever.
        """
        settings = self.settings
        properties = message.header.properties
        count = header_int(properties, REDELIVERIES)
        redelivered = bool(message.redelivered)
        if settings.queue_type == "quorum" or not redelivered:
            return RabbitMQDelivery(self.publisher, name, message, acks,
                                    redelivered or count > 0, self._settled,
                                    settings.consumer_timeout, received)
        internal = RabbitMQDelivery(self.publisher, name, message, acks, True, _nothing,
                                    settings.consumer_timeout)
        if count + 1 >= settings.delivery_limit:
            log.error("dead-lettering task message %s: delivered %d times (delivery_limit)",
                      properties.message_id, count + 1)
            reason = (f"redelivery limit: delivered {count + 1} times without being settled "
                      f"(delivery_limit={settings.delivery_limit})")
            await internal.dead_letter(reason)
            if self.on_dead_letter is not None:
                self.on_dead_letter(name, "delivery_limit", reason)
            return None
        await internal.count_redelivery(count + 1)
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
                await quietly(acks.settle(delivery_tag(message), requeue=True))
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
        self._active.discard(self)
        if channel is not None and not channel.is_closed and not self.closed:
            await self.flush()
            await quietly(channel.close())


def _nothing() -> None:
    return None
