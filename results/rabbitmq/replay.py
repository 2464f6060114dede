"""Reading past results back from the stream queue ``{prefix}.results.stream``.

The stream (``x-max-age`` = the result TTL, bound to the results exchange with ``#``) is
the durable log that ``get`` and ``watch`` of a task this process did not submit read,
starting at the time in the task's UUIDv7 id (minus ``stream_margin``), and from which the
inbox recovers what it missed while its connection was down.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import DeliveredMessage

from qtasks.brokers.rabbitmq.connection import AmqpConnection, quietly
from qtasks.errors import BrokerUnavailableError
from qtasks.protocol import ResultEvent, read_results, uuid7_time

log = logging.getLogger(__name__)

STREAM_PREFETCH = 1000
#: A task id JSON writes verbatim (no escapes), so that its bytes are in the body as is.
_VERBATIM = re.compile(r'^[ -!#-\[\]-~]*$')


class _Interrupted(Exception):
    """The connection dropped while reading the stream: start over after reconnecting."""


class ReplayAbandoned(Exception):
    """A replay given up because its caller said so (the inbox it was recovering for was
    lost again: that loss's own recovery takes over)."""


class ReplayReader:
    """Reads the events of some tasks from the stream, each read on a channel of its own,
    up to a probe message it appends (``probe``, sent by the publisher's channel)."""

    def __init__(self, connection: AmqpConnection,
                 probe: Callable[[str], Awaitable[None]]) -> None:
        self.connection = connection
        self.settings = connection.settings
        self._probe = probe

    def task(self, task_id: str) -> AsyncIterator[ResultEvent]:
        """The events of one task in the stream, from its id's time."""
        created = uuid7_time(task_id)
        start = None if created is None else created - self.settings.stream_margin
        return self.retrying({task_id}, start, f"reading results of task {task_id}")

    async def retrying(self, task_ids: set[str], start: float | None, what: str,
                       abandon: Callable[[], bool] | None = None,
                       ) -> AsyncIterator[ResultEvent]:
        """``_replay``, started over (duplicates and all: readers de-duplicate) when it is
        interrupted, for up to ``publish_timeout``.

        Interrupted means the connection dropped, or the stream is not readable yet: right
        after a node restarts, a stream queue answers NOT_FOUND ("home node ... is down")
        for a moment after clients have reconnected. When ``abandon()`` says so after an
        interruption, the retries end with ``ReplayAbandoned``.
        """
        deadline = time.monotonic() + self.settings.publish_timeout
        pause = 0.05
        while True:
            try:
                async for event in self._replay(task_ids, start):
                    yield event
                return
            except _Interrupted as exc:
                if abandon is not None and abandon():
                    raise ReplayAbandoned from exc
                if time.monotonic() + pause > deadline:
                    raise BrokerUnavailableError(
                        f"{what}: RabbitMQ did not serve the result stream within "
                        f"{self.settings.publish_timeout:g} s") from exc.__cause__
                log.debug("%s interrupted (%s); starting over", what, exc.__cause__)
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self.connection.wait_up()
                await asyncio.sleep(pause)
                pause = min(1.0, pause * 2)

    async def _replay(self, task_ids: set[str], start: float | None,
                      ) -> AsyncIterator[ResultEvent]:
        """The events of ``task_ids`` in the stream, from ``start`` (Unix time; None: the
        oldest retained) to now.

        "Now" is a probe message this reader appends to the stream after subscribing:
        when it comes back, every event published before the call has been read. Reading
        costs every message in that stretch (all tasks'), hence the start from a task id's
        UUIDv7 time rather than from the beginning.
        """
        connection = self.connection.live
        offset: Any = "first"
        if start is not None:
            offset = datetime.fromtimestamp(max(0.0, start), UTC)
        probe = f"probe.{uuid.uuid4().hex}"
        # Grouped finals carry no correlation id, and a stream delivery drops their CC
        # header: their body names the tasks. Ids JSON writes as they are can be looked
        # for in the bytes, sparing the decoding of groups of other tasks.
        needles = [task_id.encode() for task_id in task_ids if _VERBATIM.match(task_id)]
        verbatim = len(needles) == len(task_ids)
        received: asyncio.Queue[DeliveredMessage | None] = asyncio.Queue()
        try:
            channel: AbstractRobustChannel = await connection.channel(publisher_confirms=False)
        except Exception as exc:
            raise _Interrupted from exc  # the connection is down: start over once it is back
        channel.close_callbacks.add(lambda *_: received.put_nowait(None))

        async def receive(message: DeliveredMessage) -> None:
            received.put_nowait(message)

        try:
            # aiormq directly (as for the inbox): a replay reads every result message of
            # its stretch, and aio-pika's wrapper would double the cost of each.
            underlay = await channel.get_underlay_channel()
            await underlay.basic_qos(prefetch_count=STREAM_PREFETCH)
            await underlay.basic_consume(self.settings.stream_queue, receive,
                                         arguments={"x-stream-offset": offset})
            await self._probe(probe)
            unacked = 0
            while True:
                message = await received.get()
                if message is None:
                    raise _Interrupted
                unacked += 1
                if unacked >= STREAM_PREFETCH // 4:  # streams send more once acked
                    await underlay.basic_ack(message.delivery_tag or 0, multiple=True)
                    unacked = 0
                properties = message.header.properties
                if properties.message_id == probe:
                    return
                grouped = properties.correlation_id is None \
                    and properties.message_type == "batch"  # finals of several tasks
                if grouped and verbatim and not any(n in message.body for n in needles):
                    continue
                if grouped or properties.correlation_id in task_ids:
                    for event in read_results(message.body, "RabbitMQ result stream"):
                        if event.id in task_ids:
                            yield event
        except _Interrupted:
            raise
        except Exception as exc:
            if self.connection.robust is None or channel.is_closed:
                raise _Interrupted from exc
            raise
        finally:
            await quietly(channel.close())
