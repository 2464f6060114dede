"""NATS JetStream result store (nats-py): results out through a stream and a KV bucket.

The facade over its parts, each owning its own state: ``names`` (subjects, stream,
bucket), ``publisher`` (events out, finals confirmed), ``inbox`` (the submitter's live
subscription, listeners) and ``replay`` (the stream and the bucket read back). Names and
options: ``docs/nats.md``.

The final goes to the bucket first, then to the stream: whoever saw the final in the
stream (``wait``) finds it with ``get``. A worker that dies between the two leaves the
task unacked; its redelivery finds the final in the bucket and publishes it again (a
duplicate at worst), then acks. Until then, a late reader (``watch`` replaying the stream)
that finds no final in the stream takes the bucket's (``ReplayReader.read``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from qtasks.brokers.nats.connection import Connection
from qtasks.brokers.nats.settings import is_forming, number, parse_url
from qtasks.interfaces import ResultStore
from qtasks.protocol import ResultEvent
from qtasks.results.nats.inbox import LiveInbox
from qtasks.results.nats.names import Names
from qtasks.results.nats.publisher import ResultPublisher
from qtasks.results.nats.replay import ReplayReader

log = logging.getLogger(__name__)


class NatsResultStore(ResultStore):
    """Results through JetStream; see the module docstring and ``docs/nats.md``."""

    def __init__(self, url: str = "nats://127.0.0.1:4222", ttl: float | None = None,
                 **options: Any) -> None:
        self.url = url
        if ttl is not None:
            options["ttl"] = ttl
        servers, self.options = parse_url(url, options)
        self.prefix: str = self.options["prefix"]
        self.ttl = number(self.options, "ttl", 24 * 3600.0)
        self.replicas = int(number(self.options, "replicas", 1))
        self.conn = Connection(url, servers, self.options, "results")
        self.names = Names(self.prefix)
        self.stream, self.bucket = self.names.stream, self.names.bucket
        self.subject, self.key_subject = self.names.subject, self.names.key_subject
        self.task_subjects = self.names.task_subjects
        self.publisher = ResultPublisher(self.conn, self.names, replicated=self.replicas > 1)
        # No subscription per task: a buffer costs well under 1 KB.
        self.inbox = LiveInbox(self.conn, self.names,
                               number(self.options, "expect_timeout", 300.0),
                               int(number(self.options, "max_expected", 100_000)))
        self.replay = ReplayReader(self.conn, self.names)
        self.conn.reconnect_listeners.append(self.inbox.lost)
        self.conn.slow_consumer_listeners.append(self.inbox.on_slow_consumer)
        # The hot paths go straight to their part, without a call in between.
        self.publish = self.publisher.publish  # type: ignore[method-assign]
        self.get = self.replay.get  # type: ignore[method-assign]
        self.expect = self.inbox.expect  # type: ignore[method-assign]

    @property
    def reply_address(self) -> str:
        """This store's token in the subjects of the tasks it submits."""
        return self.inbox.reply

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        await self.conn.start(self._declare)

    async def _declare(self) -> None:
        window = min(120.0, self.ttl)
        await self.conn.ensure_stream(StreamConfig(
            name=self.stream, subjects=[f"{self.prefix}.results.>"], max_age=self.ttl,
            storage=StorageType.FILE, num_replicas=self.replicas, duplicate_window=window,
            description="QTasks result events, one subject per task"))
        await self.conn.ensure_stream(StreamConfig(  # what js.create_key_value would make
            name=f"KV_{self.bucket}", subjects=[f"$KV.{self.bucket}.>"], max_age=self.ttl,
            max_msgs_per_subject=1, discard=DiscardPolicy.NEW, allow_rollup_hdrs=True,
            deny_delete=True, allow_direct=True, storage=StorageType.FILE,
            num_replicas=self.replicas, duplicate_window=window,
            description="QTasks latest status of each task"))
        js = self.conn.js
        self.replay.kv = await self.conn.retry("open KV bucket",
                                               lambda: js.key_value(self.bucket),
                                               timeout=self.conn.connect_timeout,
                                               transient=is_forming)

    async def close(self) -> None:
        if not self.conn.started:
            return
        await self.publisher.close()
        await self.inbox.close()
        await self.conn.close()

    # -- publishing and reading (``publish``, ``get`` and ``expect``: see __init__) ------

    async def publish(self, event: ResultEvent, body: bytes, reply_to: str | None = None) -> None:
        await self.publisher.publish(event, body, reply_to)

    async def get(self, task_id: str) -> ResultEvent | None:
        return await self.replay.get(task_id)

    async def expect(self, task_id: str) -> None:
        await self.inbox.expect(task_id)

    async def watch(self, task_id: str) -> AsyncIterator[ResultEvent]:
        expectation = self.inbox.take(task_id)
        if expectation is not None:
            try:
                if expectation.epoch == self.conn.epoch:
                    async for event in expectation.inbox.events():
                        yield event
                        if event.is_final:
                            return
            finally:
                self.inbox.release(task_id, expectation)
            log.debug("live results of %s interrupted; replaying them from the stream", task_id)
        async for event in self.replay.read(task_id):
            yield event
            if event.is_final:
                return

    async def listen(self, task_name: str) -> AsyncIterator[ResultEvent]:
        return await self.inbox.listen(task_name)
