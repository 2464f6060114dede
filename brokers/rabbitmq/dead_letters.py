"""What an operator sees and does (``qtasks inspect``, ``qtasks dead``): queue figures and
the dead-letter queue ``{prefix}.dead``.

Dead letters are read with ``basic.get`` on a channel of their own and never acked unless
they are moved: closing the channel puts back every one that was only looked at. Each is
named by ``dead_letter_ref(body)``, the same ref any broker gives the same bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import datetime

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import ChannelClosed

from qtasks.brokers.rabbitmq.topology import DEAD_AT, ORIGIN, REASON, TaskPublisher, moved
from qtasks.interfaces import DeadLetter, QueueStats, dead_letter_ref

#: Headers of ours that a requeued message keeps (the others say why it died).
_KEPT_ON_REQUEUE = ("x-qtasks-task", "x-qtasks-attempt")


class DeadLetterOffice:
    """Counts queues, and lists, counts, requeues and purges dead letters, each on a
    short-lived channel of the broker's connection."""

    def __init__(self, publisher: TaskPublisher) -> None:
        self.publisher = publisher
        self.connection = publisher.connection
        self.settings = publisher.settings

    async def inspect(self, queues: Sequence[str]) -> list[QueueStats]:
        stats = []
        for queue in queues:
            count = await self._queue_count(self.settings.work_queue(queue))
            ready, consumers = count if count is not None else (0, 0)
            stats.append(QueueStats(queue, ready, None, consumers))
        return stats

    async def dead_count(self) -> int:
        """The dead queue's own message count (a passive declaration), none read."""
        count = await self._queue_count(self.settings.dead_queue)
        return count[0] if count is not None else 0

    async def _queue_count(self, name: str) -> tuple[int, int] | None:
        """(messages ready, consumers) of a queue, or None if it does not exist."""
        await self.connection.start()
        async with self.connection.live.channel() as channel:
            try:
                declared = await channel.declare_queue(name, passive=True, robust=False)
            except ChannelClosed:
                return None
            result = declared.declaration_result
            return result.message_count or 0, result.consumer_count or 0

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        found: list[DeadLetter] = []
        async with self._dead_queue() as queue:
            while len(found) < limit:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                found.append(_dead_letter(message))
        return found

    async def requeue_dead(self, refs: Sequence[str] | None = None) -> list[str]:
        wanted = set(refs) if refs is not None else None
        moved_refs: list[str] = []
        async with self._dead_queue() as queue:
            total = queue.declaration_result.message_count or 0
            for _ in range(total):
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                letter = _dead_letter(message)
                if wanted is not None and letter.ref not in wanted:
                    continue  # left unacked: back in the dead queue when the channel closes
                copy = moved(message.properties)
                headers = copy.headers or {}
                for name in list(headers):
                    if name.startswith("x-qtasks-") and name not in _KEPT_ON_REQUEUE:
                        del headers[name]
                await self.publisher.ensure_queue(letter.queue)
                await self.publisher.publish_raw(self.settings.tasks_exchange, letter.queue,
                                                 message.body, copy)
                await message.ack()
                moved_refs.append(letter.ref)
        return moved_refs

    async def purge_dead(self) -> int:
        async with self._dead_queue() as queue:
            result = await queue.purge()
            return int(result.message_count or 0)

    @contextlib.asynccontextmanager
    async def _dead_queue(self) -> AsyncIterator[AbstractQueue]:
        await self.connection.start()
        async with self.connection.live.channel() as channel:
            yield await channel.declare_queue(
                self.settings.dead_queue, durable=True,
                arguments=self.settings.dead_queue_arguments(), robust=False)


def _dead_letter(message: AbstractIncomingMessage) -> DeadLetter:
    headers = message.headers or {}
    reason, queue = headers.get(REASON), headers.get(ORIGIN)
    deaths = headers.get("x-death")
    death = deaths[0] if isinstance(deaths, list) and deaths \
        and isinstance(deaths[0], dict) else None
    if death is not None:  # RabbitMQ's own dead-lettering (quorum delivery limit, reject)
        reason = reason or f"RabbitMQ: {_text(death.get('reason'))}"
        keys = death.get("routing-keys")
        queue = queue or (keys[0] if isinstance(keys, list) and keys else None)
    dead_at = headers.get(DEAD_AT)
    at = float(dead_at) if isinstance(dead_at, int | float) else None
    if at is None and death is not None:
        when = death.get("time")
        at = when.timestamp() if isinstance(when, datetime) else None
    return DeadLetter(ref=dead_letter_ref(message.body),
                      queue=_text(queue or message.routing_key or "default"),
                      body=message.body, reason=_text(reason or "unknown"), at=at)


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
