"""Electing the one active periodic scheduler of a group on RabbitMQ (``Broker.lead``).

A lock queue ``{prefix}.beat.{group}`` (durable, ``x-single-active-consumer``) that every
beat of the group consumes: RabbitMQ delivers its messages to one consumer only, the
active one, and when that consumer's channel or connection dies (a killed process's
socket closes at once; a silent one after the heartbeat timeout) it makes the next
consumer active and hands it the unacked messages. Holding a message of the queue is
holding the lead.

The messages are the record: each carries the last tick enqueued per schedule (JSON). A
beat that starts publishes an empty one (so that there is one to hold), which the leader
folds in. The leader commits a batch of ticks as one AMQP transaction on the channel
that holds the lock: the task messages, the new record into the lock queue, and the
acks of the records it held. A leader that dies before ``tx.commit`` leaves nothing of
the batch and its successor gets the old record; one that dies after leaves all of it
and the new record. So each tick is enqueued exactly once without any de-duplication
downstream; the tick's deterministic task id is the second guard (a reader tells two
runs of one tick apart). The leader also re-commits the record every few minutes, so
that RabbitMQ's ``consumer_timeout`` never closes a channel holding the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

import aiormq
import orjson
from aio_pika.abc import AbstractRobustChannel
from aiormq import spec
from aiormq.abc import DeliveredMessage

from qtasks.brokers.rabbitmq.connection import AmqpConnection, quietly
from qtasks.brokers.rabbitmq.delivery import delivery_tag
from qtasks.brokers.rabbitmq.topology import TaskPublisher
from qtasks.errors import LeadershipLost
from qtasks.interfaces import Leadership
from qtasks.protocol import TaskMessage

log = logging.getLogger(__name__)

#: Seconds between re-commits of an unchanged record (well inside the default 30 min
#: ``consumer_timeout``; a third of the configured one if that is shorter).
RENEW = 300.0


def _record(state: Mapping[str, float]) -> tuple[bytes, spec.Basic.Properties]:
    return orjson.dumps(dict(state)), spec.Basic.Properties(
        delivery_mode=2, content_type="application/json", message_type="beat-record",
        app_id="qtasks")


def _read(body: bytes) -> dict[str, float]:
    try:
        recorded = orjson.loads(body)
        return {str(k): float(v) for k, v in recorded.items()}
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        log.error("RabbitMQ: a beat record is not a JSON object of times: %r", body[:200])
        return {}


class RabbitElections:
    """Lock queues of one broker's prefix."""

    def __init__(self, connection: AmqpConnection, publisher: TaskPublisher) -> None:
        self.connection = connection
        self.publisher = publisher

    def queue(self, group: str) -> str:
        return f"{self.connection.settings.prefix}.beat.{group}"

    async def lead(self, group: str) -> RabbitLeadership:
        """Consume the lock queue until a message of it arrives: then this process leads.
        A channel lost while standing by is opened again."""
        while True:
            await self.connection.start()
            await self.connection.wait_up()
            channel = await self.connection.live.channel(publisher_confirms=False)
            turn = RabbitLeadership(self, channel, self.queue(group))
            try:
                if await turn.stand_by():
                    return turn
            except Exception as exc:
                log.info("RabbitMQ: standing by for the beat lock %r failed (%s: %s); "
                         "again", group, type(exc).__name__, exc)
            await turn.resign()
            await asyncio.sleep(0.5)


class RabbitLeadership(Leadership):
    """A consumer of the lock queue; the lead once it holds a message of it."""

    def __init__(self, elections: RabbitElections, channel: AbstractRobustChannel,
                 queue: str) -> None:
        self.elections = elections
        self.settings = elections.connection.settings
        self.channel = channel
        self.queue = queue
        self.state = {}
        self.lost = asyncio.Event()
        self._underlay: aiormq.Channel | None = None
        self._held: set[int] = set()
        self._arrived = asyncio.Event()
        self._lock = asyncio.Lock()
        self._renewing: asyncio.Task[None] | None = None
        self._resigned = False

    async def stand_by(self) -> bool:
        """Declare, put an empty record in (there must be one to hold), consume, and wait
        until RabbitMQ makes this consumer the active one; False if the channel died."""
        underlay = cast(aiormq.Channel, await self.channel.get_underlay_channel())
        self._underlay = underlay
        underlay.closing.add_done_callback(lambda _: self._closed())
        arguments: dict[str, Any] = {"x-single-active-consumer": True}
        if self.settings.queue_type == "quorum":
            arguments["x-queue-type"] = "quorum"
        await underlay.queue_declare(self.queue, durable=True, arguments=arguments)
        await underlay.basic_qos(prefetch_count=1000)
        body, properties = _record({})
        await underlay.basic_publish(body, routing_key=self.queue, properties=properties)
        await underlay.basic_consume(self.queue, self._on_message)
        waits = [asyncio.ensure_future(self._arrived.wait()),
                 asyncio.ensure_future(self.lost.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        if self.lost.is_set():
            return False
        await underlay.tx_select()
        await asyncio.sleep(0.05)  # let the other records arrive, to fold them in at once
        interval = min(RENEW, self.settings.consumer_timeout / 3)
        self._renewing = asyncio.create_task(self._renew(interval), name="qtasks-beat-lock")
        return True

    async def _on_message(self, message: DeliveredMessage) -> None:
        for name, tick in _read(message.body).items():
            if tick > self.state.get(name, float("-inf")):
                self.state[name] = tick
        self._held.add(delivery_tag(message))
        self._arrived.set()

    def _closed(self) -> None:
        if not self._resigned and not self.lost.is_set():
            log.warning("RabbitMQ: the channel holding the beat lock %s closed", self.queue)
        self.lost.set()

    async def _renew(self, interval: float) -> None:
        while not self.lost.is_set():
            await asyncio.sleep(interval)
            with contextlib.suppress(LeadershipLost):
                await self.commit([], self.state)

    async def commit(self, messages: Sequence[tuple[TaskMessage, bytes]],
                     state: Mapping[str, float]) -> None:
        async with self._lock:
            underlay = self._underlay
            if self.lost.is_set() or underlay is None or underlay.is_closed:
                raise LeadershipLost("the channel holding the beat lock closed")
            publisher = self.elections.publisher
            for message, _ in messages:
                await publisher.ensure_queue(message.queue)
            held = set(self._held)
            try:
                for message, body in messages:
                    await underlay.basic_publish(
                        body, exchange=self.settings.tasks_exchange,
                        routing_key=message.queue,
                        properties=publisher.task_properties(message))
                record, properties = _record(state)
                await underlay.basic_publish(record, routing_key=self.queue,
                                             properties=properties)
                for tag in sorted(held):
                    await underlay.basic_ack(tag)
                await underlay.tx_commit()
            except Exception as exc:
                # Whatever was sent is rolled back with the channel; the lock and the
                # old record go to the next beat (maybe this one again).
                self.lost.set()
                await quietly(self.channel.close())
                raise LeadershipLost(f"committing the ticks failed ({type(exc).__name__}: "
                                     f"{exc}); the lead passes on") from None
            self._held -= held
            self.state = dict(state)

    async def resign(self) -> None:
        self._resigned = True
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._renewing
            self._renewing = None
        self.lost.set()
        # Closing the channel gives the records back: the next consumer holds them now.
        await quietly(self.channel.close())
