"""NATS JetStream broker (nats-py): tasks in through a work-queue stream.

The facade over the parts, each owning its own state: ``connection`` (one client that
reconnects), ``topology`` (names, task stream, queue consumers, the task publisher),
``consumer`` (pull requests and deliveries) and ``dead_letters`` (the dead-letter
stream, and the operator's view). Names and options: ``docs/nats.md``.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Any

from nats.aio.msg import Msg

from qtasks.brokers.nats.connection import Connection, Subscribed
from qtasks.brokers.nats.consumer import HEARTBEAT, Consumption, NatsDelivery
from qtasks.brokers.nats.dead_letters import DeadLetters, queue_stats
from qtasks.brokers.nats.leadership import Elections
from qtasks.brokers.nats.settings import number, parse_url
from qtasks.brokers.nats.topology import HEADER_RESERVE, Topology
from qtasks.errors import ConfigurationError
from qtasks.interfaces import Broker, DeadLetter, Delivery, Leadership, QueueStats
from qtasks.protocol import TaskMessage

__all__ = ["NatsBroker", "NatsDelivery"]


class NatsBroker(Broker):
    """Tasks through JetStream; see the module docstring and ``docs/nats.md``."""

    supports_priority = False  # JetStream has no message priority; use separate queues
    deduplicates = True  # Nats-Msg-Id = task id, within the stream's duplicate window

    def __init__(self, url: str = "nats://127.0.0.1:4222", **options: Any) -> None:
        self.url = url
        servers, self.options = parse_url(url, options)
        self.prefix: str = self.options["prefix"]
        ack_wait = number(self.options, "ack_wait", 30.0)
        self.max_deliver = int(number(self.options, "max_deliver", 5))
        self.fetch_timeout = number(self.options, "fetch_timeout", 5.0)
        if self.fetch_timeout < 2 * HEARTBEAT:
            raise ConfigurationError(f"NATS fetch_timeout must be at least {2 * HEARTBEAT} s")
        self.lease_interval = ack_wait / 3
        self.conn = Connection(url, servers, self.options, "broker")
        self.conn.reconnect_listeners.append(self._on_reconnect)
        self.topology = Topology(self.conn, self.prefix, ack_wait,
                                 int(number(self.options, "max_ack_pending", -1)),
                                 int(number(self.options, "replicas", 1)))
        self.dead = DeadLetters(self.conn, self.topology,
                                number(self.options, "dead_letter_ttl", 0.0))
        self.unsettled: set[NatsDelivery] = set()
        self._consumptions: set[Consumption] = set()
        self.elections = Elections(self.conn, self.prefix,
                                   int(number(self.options, "replicas", 1)))

    def subject(self, queue: str) -> str:
        return self.topology.subject(queue)

    def consumer(self, queue: str) -> str:
        return self.topology.consumer(queue)

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        await self.conn.start(self._declare)

    async def _declare(self) -> None:
        self.max_message_size = self.conn.max_payload - HEADER_RESERVE
        await self.topology.declare_stream()
        await self.dead.declare()

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
            if queue not in self.topology.consumers:
                await self.topology.declare_consumer(queue)

    def _on_reconnect(self) -> None:
        """After a reconnect the server may have forgotten our pull requests."""
        for consumption in self._consumptions:
            consumption.end_all()

    # -- tasks in and out ----------------------------------------------------------

    async def publish(self, message: TaskMessage, body: bytes) -> None:
        """Publish and wait for the PubAck, retrying through a reconnect for
        ``publish_timeout``."""
        await self.start()  # a no-op once started; lets a bare broker publish at once
        subject, headers = self.topology.task(message, body)
        conn, stream = self.conn, self.topology.stream
        await conn.retry(f"publish task {message.id}", lambda: conn.publish(
            subject, body, headers=headers, stream=stream))

    async def consume(self, queues: Sequence[str], prefetch: int) -> AsyncIterator[Delivery]:
        await self.declare(queues)
        consumption = Consumption(self.conn, self.topology, self.dead, self.unsettled, queues,
                                  prefetch, max_deliver=self.max_deliver,
                                  fetch_timeout=self.fetch_timeout,
                                  on_dead_letter=self.on_dead_letter)
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

    # -- control (cancel requests) ---------------------------------------------------

    async def broadcast(self, body: bytes) -> None:
        """A core publish (workers listening now get it; nothing stores it), flushed
        with a PING so that the server has it when this returns."""
        await self.start()
        await self.conn.nc.publish(self.topology.control_subject, body)
        await self.conn.barrier()

    async def control(self) -> AsyncIterator[bytes]:
        await self.start()
        received: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_msg(msg: Msg) -> None:
            received.put_nowait(msg.data)

        return _control(received, await self.conn.subscribe(self.topology.control_subject,
                                                            on_msg))

    # -- operations (qtasks inspect / dead) ------------------------------------------

    async def inspect(self, queues: Sequence[str]) -> list[QueueStats]:
        await self.declare(queues)
        return await queue_stats(self.topology, queues)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        await self.start()
        return await self.dead.oldest(limit)

    async def dead_count(self) -> int:
        await self.start()
        return await self.dead.count()

    async def requeue_dead(self, refs: Sequence[str] | None = None) -> list[str]:
        await self.start()
        return await self.dead.requeue(refs)

    async def purge_dead(self) -> int:
        await self.start()
        return await self.dead.purge()

    # -- periodic schedulers (qtasks beat): leadership.py ------------------------------

    async def lead(self, group: str, ttl: float) -> Leadership:
        await self.start()
        owner = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        return await self.elections.lead(group, ttl, owner, self.publish)


async def _control(received: asyncio.Queue[bytes], sub: Subscribed) -> AsyncIterator[bytes]:
    try:
        while True:
            yield await received.get()
    finally:
        await sub.unsubscribe()
