"""Cancel requests over RabbitMQ: broadcast to every worker, never queued for later.

A fanout exchange ``{prefix}.control`` (durable, so that declaring it is idempotent);
each subscribed worker binds an exclusive, auto-delete queue of its own to it, which a
robust channel declares, binds and consumes again after a reconnect. What is broadcast
while a worker is disconnected does not reach it: a request is for the workers of now.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aio_pika import ExchangeType
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel
from aio_pika.abc import AbstractRobustConnection as Connection
from aiormq import spec

from qtasks.brokers.rabbitmq.connection import quietly, retrying, send
from qtasks.brokers.rabbitmq.settings import AmqpSettings


def control_exchange(settings: AmqpSettings) -> str:
    return f"{settings.prefix}.control"


async def broadcast(connection: Connection, settings: AmqpSettings, body: bytes) -> None:
    """Publish ``body`` with a confirm: when this returns, every queue bound now has it."""
    async def attempt() -> None:
        async with connection.channel() as channel:  # confirms on: rare, so its own channel
            await channel.declare_exchange(control_exchange(settings), ExchangeType.FANOUT,
                                           durable=True)
            properties = spec.Basic.Properties(content_type="application/json",
                                               message_type="control", app_id="qtasks")
            await send(channel, control_exchange(settings), "", body, properties,
                       mandatory=False, timeout=settings.publish_timeout)

    await retrying(settings, "broadcasting on the control channel", attempt)


async def subscribe(connection: Connection, settings: AmqpSettings) -> AsyncIterator[bytes]:
    """Bound and consuming when this returns; the iterator deletes its queue when closed."""
    channel: AbstractRobustChannel = await connection.channel()
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def receive(message: AbstractIncomingMessage) -> None:
        received.put_nowait(message.body)

    try:
        exchange = await channel.declare_exchange(control_exchange(settings),
                                                  ExchangeType.FANOUT, durable=True)
        queue = await channel.declare_queue(settings.private_queue("control"),
                                            exclusive=True, auto_delete=True)
        await queue.bind(exchange)
        tag = await queue.consume(receive, no_ack=True)
    except BaseException:
        await quietly(channel.close())
        raise
    return _following(channel, queue, tag, received)


async def _following(channel: AbstractRobustChannel, queue: AbstractQueue, tag: str,
                     received: asyncio.Queue[bytes]) -> AsyncIterator[bytes]:
    try:
        while True:
            yield await received.get()
    finally:
        # Cancelled first, so that the robust channel does not restore the consumer.
        await quietly(queue.cancel(tag))
        await quietly(channel.close())
