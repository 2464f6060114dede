"""Whether the result stream queue takes writes again after a reconnect.

Right after a RabbitMQ node restarts, clients reconnect before the node runs its stream
queues; for that moment a publish routed to the stream is confirmed and dropped (3.10; a
consumer gets NOT_FOUND "home node ... is down"). So after a reconnect, results wait
until the stream answers a consumer.
"""

from __future__ import annotations

import asyncio
import logging

from aio_pika.abc import AbstractRobustConnection
from aiormq.abc import DeliveredMessage

from qtasks.brokers.rabbitmq.connection import AmqpConnection, Background, quietly

log = logging.getLogger(__name__)


class StreamGate:
    """``ready`` is set while the stream queue takes writes: at start, and after a
    reconnect once a consumer can attach to it again."""

    def __init__(self, connection: AmqpConnection, background: Background) -> None:
        self.connection = connection
        self.settings = connection.settings
        self.ready = asyncio.Event()
        self._background = background
        connection.setup.append(self._open)
        connection.loss_listeners.append(self.ready.clear)
        connection.reconnect_listeners.append(self._restored)

    async def _open(self, _connection: AbstractRobustConnection) -> None:
        self.ready.set()

    def _restored(self) -> None:
        self._background.spawn(self._await_stream())

    async def _await_stream(self) -> None:
        """Set ``ready`` once a consumer can attach to the stream queue again."""
        pause = 0.05
        while (connection := self.connection.robust) is not None:
            if self.ready.is_set():
                return
            try:
                channel = await connection.channel(publisher_confirms=False)
                try:
                    underlay = await channel.get_underlay_channel()
                    await underlay.basic_qos(prefetch_count=1)
                    ok = await underlay.basic_consume(
                        self.settings.stream_queue, _ignore,
                        arguments={"x-stream-offset": "next"})
                    await underlay.basic_cancel(ok.consumer_tag or "")
                finally:
                    await quietly(channel.close())
            except Exception as exc:
                log.debug("result stream not readable yet (%s); waiting", exc)
                await asyncio.sleep(pause)
                pause = min(1.0, pause * 2)
                continue
            if self.connection.up.is_set():
                self.ready.set()
            return

    async def writable(self) -> None:
        """Wait (up to ``publish_timeout``) for ``ready``; past that, publish anyway
        rather than stall the worker, and say so."""
        try:
            await asyncio.wait_for(self.ready.wait(), self.settings.publish_timeout)
        except TimeoutError:
            log.warning("the result stream %s did not come back within %g s after a "
                        "reconnect; publishing anyway", self.settings.stream_queue,
                        self.settings.publish_timeout)
            self.ready.set()  # given up for this outage; the next loss clears it


async def _ignore(_message: DeliveredMessage) -> None:
    return None
