"""A task message on loan to a worker, and the settlements of one channel's deliveries.

A delivery holds what settles it (its channel's ``ChannelAcks``) and what moves it
elsewhere (the ``TaskPublisher``: a delay queue, the dead-letter exchange), never the
broker: settling is all it can do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.exceptions import ChannelInvalidStateError
from aiormq import spec
from aiormq.abc import AbstractChannel, DeliveredMessage

from qtasks.brokers.rabbitmq.settings import delay_bucket_ms
from qtasks.brokers.rabbitmq.topology import (
    DEAD_AT,
    ORIGIN,
    REASON,
    REDELIVERIES,
    TaskPublisher,
    moved,
)
from qtasks.interfaces import Delivery

log = logging.getLogger(__name__)


def delivery_tag(message: DeliveredMessage) -> int:
    return message.delivery.delivery_tag or 0  # type: ignore[union-attr]  # a Deliver


def header_int(properties: spec.Basic.Properties, name: str) -> int:
    try:
        return int((properties.headers or {}).get(name) or 0)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


class ChannelAcks:
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

    def __init__(self, publisher: TaskPublisher, queue: str, message: DeliveredMessage,
                 acks: ChannelAcks, redelivered: bool, on_settled: Callable[[], None],
                 consumer_timeout: float, received: float | None = None) -> None:
        self.body = message.body
        self.redelivered = redelivered
        self.queue = queue
        self.message = message
        self.properties: spec.Basic.Properties = message.header.properties
        self._tag = delivery_tag(message)
        self._acks = acks
        self._publisher = publisher
        self._consumer_timeout = consumer_timeout
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
            await self._publisher.publish_delayed(self.queue, ttl, self.body,
                                                  moved(self.properties))
            self._acks.ack(self._tag)

        await self._settle("delay", move, fallback=self._nack)

    async def dead_letter(self, reason: str) -> None:
        async def move() -> None:
            await self._publisher.publish_dead(self.queue, self.body, moved(
                self.properties, **{REASON: reason[:4000], ORIGIN: self.queue,
                                    DEAD_AT: int(time.time())}))
            self._acks.ack(self._tag)

        # If the copy cannot be published, RabbitMQ's own dead-lettering still keeps the
        # message (with an x-death header instead of our reason).
        await self._settle("dead-letter", move, fallback=lambda: self._acks.settle(
            self._tag, requeue=False, reject=True))

    async def count_redelivery(self, count: int) -> None:
        """Put the message back with ``x-qtasks-redeliveries`` set to ``count`` (a copy
        published, this delivery acked), for a classic queue, which says only *that* a
        message was delivered before; given back as it is if the copy fails."""
        async def move() -> None:
            await self._publisher.publish_raw(
                self._publisher.settings.tasks_exchange, self.queue, self.body,
                moved(self.properties, **{REDELIVERIES: count}))
            self._acks.ack(self._tag)

        await self._settle("count the redelivery of", move, fallback=self._nack)

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
        limit = self._consumer_timeout
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


async def _nothing() -> None:
    return None
