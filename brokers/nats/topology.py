"""The NATS broker's names, its task stream and queue consumers, and the task publisher.

Layout (all names derive from ``prefix``, see ``docs/nats.md``):

- stream ``{prefix}_TASKS`` (work-queue retention, file storage) captures
  ``{prefix}.tasks.>``; a task for queue ``q`` is published on ``{prefix}.tasks.<q>``;
- one durable pull consumer ``{prefix}_q_<q>`` per queue, shared by every worker
  (competing consumers), explicit acks;
- ``{prefix}.control``: cancel requests, core NATS (nothing stores them).

Dead letters have a stream of their own (``dead_letters``).
"""

from __future__ import annotations

import logging

from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from qtasks.brokers.nats.connection import Connection
from qtasks.brokers.nats.pubacks import EXPECTED_STREAM
from qtasks.brokers.nats.settings import forming_hint, is_forming, token
from qtasks.errors import BrokerUnavailableError, MessageTooLargeError
from qtasks.protocol import TaskMessage

log = logging.getLogger(__name__)

#: Timeouts in a row of a consumer's creation after which the client moves to another
#: server of its URL.
SERVER_TIMEOUTS = 2

#: Header names, part of the documented wire format.
MSG_ID = "Nats-Msg-Id"
NOT_BEFORE = "QTasks-Not-Before"

#: Bytes of ``max_payload`` kept for headers: the server closes the connection of a
#: client whose message (headers + body) is over ``max_payload``.
HEADER_RESERVE = 512


def headers_size(headers: dict[str, str], stream: str | None = None) -> int:
    """Bytes that ``headers`` add to a message, as the server counts them against
    ``max_payload`` (with the ``Nats-Expected-Stream`` header a publish to ``stream``
    adds); 0 for none."""
    if not headers and stream is None:
        return 0
    size = len(b"NATS/1.0\r\n\r\n")
    if stream is not None:
        size += len(EXPECTED_STREAM) + len(stream) + 4
    for key, value in headers.items():
        size += len(key) + len(value.encode()) + 4
    return size


def read_float(value: str | None) -> float | None:
    """A header's number, or None if it is missing or not a number."""
    try:
        return float(value) if value else None
    except ValueError:
        return None


class Topology:
    """The task stream and the queues' consumers of one prefix, and publishing into it."""

    def __init__(self, conn: Connection, prefix: str, ack_wait: float, max_ack_pending: int,
                 replicas: int) -> None:
        self.conn = conn
        self.prefix = prefix
        self.ack_wait = ack_wait
        self.max_ack_pending = max_ack_pending
        self.replicas = replicas
        self.stream = f"{prefix}_TASKS"
        self.control_subject = f"{prefix}.control"
        self.consumers: set[str] = set()

    def subject(self, queue: str) -> str:
        return f"{self.prefix}.tasks.{token(queue)}"

    def consumer(self, queue: str) -> str:
        return f"{self.prefix}_q_{token(queue)}"

    def next_subject(self, queue: str) -> str:
        return f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer(queue)}"

    async def declare_stream(self) -> None:
        await self.conn.ensure_stream(StreamConfig(
            name=self.stream, subjects=[f"{self.prefix}.tasks.>"],
            retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
            num_replicas=self.replicas,
            description="QTasks task messages, one subject per queue"))

    async def declare_consumer(self, queue: str) -> None:
        name = self.consumer(queue)
        config = ConsumerConfig(
            name=name, durable_name=name, ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL, ack_wait=self.ack_wait, max_deliver=-1,
            filter_subject=self.subject(queue), max_ack_pending=self.max_ack_pending,
            description=f"QTasks workers of queue {queue!r}")
        js, timeouts = self.conn.js, 0

        async def create() -> object:
            nonlocal timeouts
            try:
                return await js.add_consumer(self.stream, config)
            except TimeoutError:
                timeouts += 1
                nc = self.conn.nc
                if timeouts % SERVER_TIMEOUTS == 0 and nc.is_connected:
                    # Its server does not answer for JetStream (measured: one frozen and
                    # thawed stayed out of step with its cluster for minutes): another.
                    log.warning("queue %s: the NATS server does not answer JetStream "
                                "requests; moving to another server", queue)
                    await nc.force_reconnect()
                raise

        try:
            # A consumer of a replicated stream is placed like the stream: at start-up,
            # the cluster may not have the peers or the stream leader yet.
            await self.conn.retry(f"create consumer {name}", create,
                                  timeout=self.conn.connect_timeout, transient=is_forming)
        except Exception as exc:
            if not is_forming(exc):
                raise
            raise BrokerUnavailableError(
                f"cannot create consumer {name} of stream {self.stream} within "
                f"{self.conn.connect_timeout:g} s: {type(exc).__name__}: {exc}"
                f"{forming_hint(exc)}") from None
        self.consumers.add(queue)

    def task(self, message: TaskMessage, body: bytes) -> tuple[str, dict[str, str]]:
        """The subject and headers to publish a task with (a JetStream publish to
        ``stream``); ``Nats-Msg-Id`` makes a retried publish count once. A message
        over the server's ``max_payload`` is refused here, before it is sent."""
        headers = {MSG_ID: f"{message.id}:{message.attempt}"}
        if message.not_before is not None:
            headers[NOT_BEFORE] = repr(message.not_before)
        size = len(body) + headers_size(headers, self.stream)
        limit = self.conn.max_payload
        if size > limit:
            raise MessageTooLargeError(
                f"task {message.task!r} id {message.id}: message is {size} bytes with "
                f"headers, over the NATS server's max_payload of {limit} bytes")
        return self.subject(message.queue), headers

    async def publish_body(self, queue: str, body: bytes, msg_id: str) -> None:
        """Put ``body`` (a dead letter's) back on ``queue``; ``Nats-Msg-Id`` if it fits
        within ``max_payload`` (a body the server took must never be refused)."""
        headers = {MSG_ID: msg_id}
        if len(body) + headers_size(headers, self.stream) > self.conn.max_payload:
            await self.conn.publish(self.subject(queue), body)
        else:
            await self.conn.publish(self.subject(queue), body, headers=headers,
                                    stream=self.stream)
