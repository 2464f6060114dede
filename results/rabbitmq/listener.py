"""Live subscriptions (``listen``): one exclusive queue ``{prefix}.listen.{hex}`` each,
bound to the results exchange with ``{task}.*`` (``#`` for every task).

Live means live: after a reconnect the robust channel declares, binds and consumes the
queue again, and what was published while the connection was down is not seen. A
listener that falls ``LISTEN_MAX_LENGTH`` events behind loses its oldest ones, not the
broker's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel

from qtasks.brokers.rabbitmq.connection import AmqpConnection, quietly
from qtasks.protocol import ResultEvent, read_results

LISTEN_PREFETCH = 1000
LISTEN_MAX_LENGTH = 100_000


async def listen(connection: AmqpConnection, task_name: str) -> AsyncIterator[ResultEvent]:
    """Bound and consuming when this returns; the iterator deletes its queue when closed."""
    settings = connection.settings
    channel = await connection.live.channel()
    received: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def receive(message: AbstractIncomingMessage) -> None:
        received.put_nowait(message)

    try:
        await channel.set_qos(prefetch_count=LISTEN_PREFETCH)
        queue = await channel.declare_queue(
            settings.private_queue("listen"), exclusive=True, auto_delete=True,
            arguments={"x-max-length": LISTEN_MAX_LENGTH, "x-overflow": "drop-head"})
        await queue.bind(settings.results_exchange,
                         "#" if task_name == "*" else f"{task_name}.*")
        tag = await queue.consume(receive)
    except BaseException:
        await quietly(channel.close())
        raise
    return _listening(connection, channel, queue, tag, received, task_name)


async def _listening(connection: AmqpConnection, channel: AbstractRobustChannel,
                     queue: AbstractQueue, tag: str,
                     received: asyncio.Queue[AbstractIncomingMessage], task_name: str,
                     ) -> AsyncIterator[ResultEvent]:
    unacked = 0
    try:
        while True:
            message = await received.get()
            unacked += 1
            if unacked >= LISTEN_PREFETCH // 4 or received.empty():
                with contextlib.suppress(Exception):  # from a channel that has died
                    await message.ack(multiple=True)
                unacked = 0
            for event in read_results(message.body, "RabbitMQ result listener"):
                if task_name in ("*", event.task):  # a group of finals holds others
                    yield event
    finally:
        # Cancelled first, so that the robust channel does not restore the consumer;
        # the queue (auto-delete) goes with it.
        if connection.robust is not None:
            await quietly(queue.cancel(tag))
            await quietly(queue.delete(if_unused=False, if_empty=False))
            await quietly(channel.close())
