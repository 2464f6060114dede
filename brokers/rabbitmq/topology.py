"""The broker's exchanges and queues, and publishing task messages into them.

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
returns once RabbitMQ has taken the message, and an unroutable one is an error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aio_pika.exceptions import PublishError
from aiormq import spec

from qtasks.brokers.rabbitmq.confirms import ConfirmChannel
from qtasks.brokers.rabbitmq.connection import AmqpConnection, declaring, retrying
from qtasks.brokers.rabbitmq.settings import (
    DELAY_QUEUE_IDLE_MS,
    DELAY_REDECLARE_S,
    delay_bucket_ms,
)
from qtasks.errors import QTasksError
from qtasks.protocol import TaskMessage

#: How many times a classic-queue message was handed out before (quorum queues count in
#: ``x-delivery-count`` themselves).
REDELIVERIES = "x-qtasks-redeliveries"
REASON = "x-qtasks-reason"
ORIGIN = "x-qtasks-queue"
DEAD_AT = "x-qtasks-dead-at"
#: Headers RabbitMQ or this backend manages; stripped when a message is copied elsewhere.
_MANAGED = {"x-death", "x-first-death-exchange", "x-first-death-queue",
            "x-first-death-reason", "x-delivery-count"}


def moved(properties: spec.Basic.Properties, **headers: Any) -> spec.Basic.Properties:
    """The same properties (body unchanged), for moving a message to another queue: what
    RabbitMQ manages dropped, ``headers`` added."""
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


class TaskPublisher:
    """Declares the broker's exchanges and queues (each once per connection) and
    publishes task messages: new tasks, delayed ones, dead letters and re-published
    redeliveries. Its channels: one with confirms that raises on returns (publishing),
    one for declarations."""

    def __init__(self, connection: AmqpConnection, supports_priority: bool) -> None:
        self.connection = connection
        self.settings = connection.settings
        self.supports_priority = supports_priority
        self._publisher = ConfirmChannel(connection, "RabbitMQ broker", on_return_raises=True)
        self._admin: AbstractRobustChannel | None = None
        self._declared: set[str] = set()
        self._delay_declared: dict[str, float] = {}
        self._lock = asyncio.Lock()
        connection.setup.append(self._open)
        # A broker restarted without its durable queues (a new node) needs them again.
        connection.reconnect_listeners.append(self.forget)

    async def _open(self, connection: AbstractRobustConnection) -> None:
        settings = self.settings
        # Returns raise PublishError: an unroutable task is an error, not lost.
        await self._publisher.open(connection)
        admin = await connection.channel()
        await admin.declare_exchange(settings.tasks_exchange, "direct", durable=True)
        dlx = await admin.declare_exchange(settings.dead_exchange, "fanout", durable=True)
        dead = await admin.declare_queue(settings.dead_queue, durable=True,
                                         arguments=settings.dead_queue_arguments())
        await dead.bind(dlx, "")
        self._admin = admin

    def forget(self) -> None:
        """Declare every queue again before its next use."""
        self._declared.clear()
        self._delay_declared.clear()

    # -- declaring ---------------------------------------------------------------------

    async def ensure_queue(self, queue: str, force: bool = False) -> None:
        name = self.settings.work_queue(queue)
        if name in self._declared and not force:
            return
        async with self._lock:
            if name in self._declared and not force:
                return
            async def declare() -> None:
                declared = await self._admin_channel().declare_queue(
                    name, durable=True, arguments=self.settings.work_queue_arguments(),
                    robust=False)
                await declared.bind(self.settings.tasks_exchange, queue, robust=False)

            # A quorum queue is declared by a majority of a cluster's nodes: retried while
            # the cluster forms or elects.
            await declaring(self.connection, f"declaring queue {name}", declare)
            self._declared.add(name)

    async def _ensure_delay_queue(self, queue: str, ttl_ms: int, force: bool = False) -> str:
        name = self.settings.delay_queue(queue, ttl_ms)
        now = time.monotonic()
        if not force and now - self._delay_declared.get(name, -1e9) < DELAY_REDECLARE_S:
            return name
        await declaring(self.connection, f"declaring queue {name}",
                        lambda: self._admin_channel().declare_queue(
                            name, durable=True, robust=False,
                            arguments=self.settings.delay_queue_arguments(queue, ttl_ms)))
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

    def task_properties(self, message: TaskMessage) -> spec.Basic.Properties:
        """A task message's AMQP properties: persistent, its id, task and attempt (and
        priority, where the queue orders by it)."""
        priority = min(max(message.priority, 0), self.settings.max_priority)
        return spec.Basic.Properties(
            delivery_mode=2, content_type="application/json", message_id=message.id,
            message_type="task", app_id="qtasks",
            priority=priority if priority and self.supports_priority else None,
            headers={"x-qtasks-task": message.task, "x-qtasks-attempt": message.attempt},
        )

    async def publish(self, message: TaskMessage, body: bytes) -> None:
        await self.connection.start()
        await self.ensure_queue(message.queue)
        properties = self.task_properties(message)
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
        await self.connection.start()
        await self.ensure_queue(queue)
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
                await self.ensure_queue(routing_key, force=True)
            redeclare = redeclare_work_queue

        async def attempt() -> None:
            publisher = self._publisher
            timeout = self.settings.publish_timeout
            try:
                await publisher.send(exchange, routing_key, body, properties, True, timeout)
            except PublishError:
                if redeclare is None:
                    raise
                await redeclare()
                await publisher.send(exchange, routing_key, body, properties, True, timeout)

        await self.connection.start()
        try:
            await retrying(self.settings, f"publishing task {properties.message_id}", attempt)
        except PublishError as exc:
            raise QTasksError(
                f"RabbitMQ returned task {properties.message_id} as unroutable "
                f"(exchange {exchange!r}, routing key {routing_key!r})") from exc
