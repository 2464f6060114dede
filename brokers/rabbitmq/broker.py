"""The RabbitMQ broker (tasks in), on aio-pika: the ``Broker`` that the core sees.

A facade over the parts, each in its own module: one ``AmqpConnection`` (connection.py),
the exchanges, queues and publishing (topology.py), consuming and settling (consumer.py,
delivery.py), cancel broadcasts (control.py) and the operator's dead letters and queue
figures (dead_letters.py). ``docs/rabbitmq.md`` has the names and options.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any

from qtasks.brokers.rabbitmq import control as rabbitmq_control
from qtasks.brokers.rabbitmq.connection import AmqpConnection, OnAmqpConnection
from qtasks.brokers.rabbitmq.consumer import TaskConsumers
from qtasks.brokers.rabbitmq.dead_letters import DeadLetterOffice
from qtasks.brokers.rabbitmq.leadership import RabbitElections
from qtasks.brokers.rabbitmq.settings import AmqpSettings
from qtasks.brokers.rabbitmq.topology import TaskPublisher
from qtasks.interfaces import Broker, DeadLetter, Delivery, Leadership, QueueStats
from qtasks.protocol import TaskMessage


class RabbitMQBroker(OnAmqpConnection, Broker):
    """Tasks over RabbitMQ. ``RabbitMQBroker("amqp://user:pass@host/vhost?prefix=app")``;
    options in the URL query or as keywords (see ``settings.AmqpSettings``)."""

    #: The worker calls ``keep_alive`` this often; here only to warn before RabbitMQ's
    #: ``consumer_timeout`` (the lease itself lasts as long as the channel).
    lease_interval = 60.0
    #: RabbitMQ's default ``max_message_size`` (128 MiB).
    max_message_size = 128 * 1024 * 1024

    def __init__(self, url: str = "amqp://guest:guest@localhost/", **options: Any) -> None:
        self.settings = AmqpSettings.parse(url, options)
        self.url = self.settings.display_url
        if self.settings.queue_type == "quorum" or not self.settings.max_priority:
            # Quorum queues on RabbitMQ 3.10 ignore priorities (and max_priority=0 turns
            # them off): the app then refuses them up front instead of ignoring them.
            self.supports_priority = False
        self.max_priority = self.settings.max_priority
        self.connection = AmqpConnection(self.settings, "broker")
        self.publisher = TaskPublisher(self.connection, self.supports_priority)
        self.consumers = TaskConsumers(self.publisher)
        self.dead = DeadLetterOffice(self.publisher)
        self.elections = RabbitElections(self.connection, self.publisher)

    def __repr__(self) -> str:
        return f"<RabbitMQBroker {self.url} prefix={self.settings.prefix}>"

    async def close(self) -> None:
        await self.consumers.close()
        self.publisher.forget()
        await self.connection.close()

    async def declare(self, queues: Sequence[str]) -> None:
        await self.connection.start()
        for queue in queues:
            await self.publisher.ensure_queue(queue)

    # The hot paths hand the parts' coroutines and iterators on, adding no await.

    def publish(self, message: TaskMessage, body: bytes) -> Coroutine[Any, Any, None]:
        return self.publisher.publish(message, body)

    def consume(self, queues: Sequence[str], prefetch: int) -> AsyncIterator[Delivery]:
        return self.consumers.consume(queues, prefetch, self.on_dead_letter)

    # -- control (cancel requests): control.py -------------------------------------------

    async def broadcast(self, body: bytes) -> None:
        await self.connection.start()
        await rabbitmq_control.broadcast(self.connection.live, self.settings, body)

    async def control(self) -> AsyncIterator[bytes]:
        await self.connection.start()
        return await rabbitmq_control.subscribe(self.connection.live, self.settings)

    # -- operations (qtasks inspect / dead): dead_letters.py -----------------------------

    async def inspect(self, queues: Sequence[str]) -> list[QueueStats]:
        return await self.dead.inspect(queues)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return await self.dead.dead_letters(limit)

    async def dead_count(self) -> int:
        return await self.dead.dead_count()

    async def requeue_dead(self, refs: Sequence[str] | None = None) -> list[str]:
        return await self.dead.requeue_dead(refs)

    async def purge_dead(self) -> int:
        return await self.dead.purge_dead()

    # -- periodic schedulers (qtasks beat): leadership.py --------------------------------

    async def lead(self, group: str, ttl: float) -> Leadership:
        # ``ttl`` is RabbitMQ's to keep: a dead consumer's lock passes on when its
        # connection closes (at once for a killed process, else at the heartbeat timeout).
        return await self.elections.lead(group)
