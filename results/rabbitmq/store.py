"""The RabbitMQ result store (results out), on aio-pika: the ``ResultStore`` the core sees.

Every event is published once, to the topic exchange ``{prefix}.results`` with routing
key ``{task}.{id}``. Bound to it: the stream queue that late readers replay (replay.py),
this process's inbox for the tasks it submits or follows (inbox.py), and one queue per
live listener (listener.py). Publishing, with pipelined partials and grouped finals, is
publisher.py and finals.py. This facade holds the parts and their one connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any

from qtasks.brokers.rabbitmq.connection import AmqpConnection, Background, OnAmqpConnection
from qtasks.brokers.rabbitmq.settings import AmqpSettings
from qtasks.interfaces import ResultStore
from qtasks.protocol import ResultEvent
from qtasks.results.rabbitmq import listener
from qtasks.results.rabbitmq.inbox import ResultInbox
from qtasks.results.rabbitmq.publisher import ResultPublisher
from qtasks.results.rabbitmq.replay import ReplayReader
from qtasks.results.rabbitmq.stream_gate import StreamGate


class RabbitMQResultStore(OnAmqpConnection, ResultStore):
    """Results over RabbitMQ: ``RabbitMQResultStore("amqp://...?prefix=app&ttl=3600")``."""

    def __init__(self, url: str = "amqp://guest:guest@localhost/", **options: Any) -> None:
        self.settings = AmqpSettings.parse(url, options)
        self.url = self.settings.display_url
        self.ttl = self.settings.ttl
        self.connection = AmqpConnection(self.settings, "results")
        self._background = Background()
        self.publisher = ResultPublisher(self.connection,
                                         StreamGate(self.connection, self._background))
        self.replay = ReplayReader(self.connection, self.publisher.probe)
        self.inbox = ResultInbox(self.connection, self.replay, self._background)
        self.reads = self.inbox.reads  # every finite read of the stream, shared

    def __repr__(self) -> str:
        return f"<RabbitMQResultStore {self.url} prefix={self.settings.prefix}>"

    @property
    def reply_address(self) -> str:
        """The inbox's binding key; the worker puts it in the ``BCC`` header."""
        return self.inbox.name

    async def close(self) -> None:
        """Send gathered partials, wait (up to ``publish_timeout``) for pipelined
        publishes, then disconnect."""
        await self.publisher.drain()
        self.reads.close()
        self.inbox.close()
        self._background.cancel()
        await self.connection.close()

    def publish(self, event: ResultEvent, body: bytes,
                reply_to: str | None = None) -> Coroutine[Any, Any, None]:
        return self.publisher.publish(event, body, reply_to)  # no await added: a hot path

    async def expect(self, task_id: str) -> None:
        await self.connection.start()
        await self.inbox.expect(task_id)

    def watch(self, task_id: str) -> AsyncIterator[ResultEvent]:
        return self.inbox.watch(task_id)  # the inbox's own iterator: no layer per event

    async def get(self, task_id: str) -> ResultEvent | None:
        await self.connection.start()
        final = self.inbox.final_of(task_id) or await self.replay.known_final(task_id)
        if final is not None:
            return final
        latest: ResultEvent | None = None
        for event in await self.reads.read([task_id], "latest"):
            if event.kind != "partial":
                latest = event
        # Nothing newer than what the stream index knows: the latest it saw.
        return latest or await self.replay.known_latest(task_id)

    async def history(self, task_id: str) -> list[ResultEvent]:
        """The stream alone, up to a probe: no binding of the inbox (a binding is a
        write on the broker, slower than the read)."""
        await self.connection.start()
        return await self.reads.read([task_id])

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, ResultEvent]:
        """One read of the stream for all of them (a read costs its stretch of the
        stream, whatever the number of tasks)."""
        await self.connection.start()
        latest = {task_id: final for task_id in task_ids
                  if (final := self.inbox.final_of(task_id)
                      or await self.replay.known_final(task_id)) is not None}
        rest = set(task_ids) - set(latest)
        for event in await self.reads.read(rest, "latest") if rest else []:
            if event.kind != "partial":
                latest[event.id] = event
        for task_id in rest - set(latest):
            if (status := await self.replay.known_latest(task_id)) is not None:
                latest[task_id] = status
        return latest

    async def listen(self, task_name: str) -> AsyncIterator[ResultEvent]:
        await self.connection.start()
        return await listener.listen(self.connection, task_name)
