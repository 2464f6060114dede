"""Publishing result events: pipelined partials and statuses, gathered partials, and
finals that wait for everything before them.

Every event is published once, to the topic exchange ``{prefix}.results`` with routing
key ``{task}.{id}`` (dots in the id become ``_``); the stream queue, inboxes and listeners
bound to it take their copies. Partials and statuses are pipelined (the publish returns
once the frame is written); a final waits for the confirms of every earlier event of its
task, re-publishes any that failed, and is itself confirmed (alone or in a group, see
finals.py) before ``publish`` returns, because the worker acks the task right after.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractRobustConnection
from aiormq import spec

from qtasks.brokers.rabbitmq.confirms import ConfirmChannel
from qtasks.brokers.rabbitmq.connection import AmqpConnection, retrying
from qtasks.protocol import ResultEvent, encode_batch
from qtasks.results.rabbitmq.finals import FinalsCommitter, envelope
from qtasks.results.rabbitmq.stream_gate import StreamGate

log = logging.getLogger(__name__)

#: Unconfirmed pipelined publishes per store; past it ``publish`` waits (backpressure).
MAX_IN_FLIGHT = 1000
#: A task with this many result messages unconfirmed gathers its next partials into one
#: ``batch`` message, sent as soon as fewer are unconfirmed (or before any other event of
#: the task). Below it every partial goes out at once: batching adds no latency at a low
#: yield rate, and at a high one the broker handles one message per batch, not per value.
BATCH_AFTER = 8
BATCH_MAX_EVENTS = 1000
BATCH_MAX_BYTES = 256 * 1024


@dataclass(slots=True)
class _Batch:
    """Partials of one task waiting to go out together, in order."""

    task: str
    attempt: int
    first_seq: int
    reply_to: str | None
    bodies: list[bytes]
    size: int = 0

    @property
    def full(self) -> bool:
        return len(self.bodies) >= BATCH_MAX_EVENTS or self.size >= BATCH_MAX_BYTES


@dataclass(slots=True)
class _Pending:
    body: bytes
    properties: spec.Basic.Properties
    routing_key: str
    future: asyncio.Future[Any]

    @property
    def failed(self) -> bool:
        return self.future.cancelled() or self.future.exception() is not None


class ResultPublisher:
    """Publishes the events of every task on one channel (confirms on), declaring the
    results exchange and the stream queue when the connection is made."""

    def __init__(self, connection: AmqpConnection, gate: StreamGate) -> None:
        self.connection = connection
        self.settings = connection.settings
        self._gate = gate
        #: Publishes here; a fresh channel when a stream leader moved (``confirms``).
        self._out = ConfirmChannel(connection, "RabbitMQ result store")
        #: Per task: publishes awaiting their confirm, in order; those that failed.
        self._pending: dict[str, deque[_Pending]] = {}
        self._failed: dict[str, list[_Pending]] = {}
        self._batches: dict[str, _Batch] = {}
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._finals = FinalsCommitter(self._send_with_timeout)
        connection.setup.append(self._open)

    async def _open(self, connection: AbstractRobustConnection) -> None:
        settings = self.settings
        channel = await connection.channel()
        exchange = await channel.declare_exchange(settings.results_exchange, "topic",
                                                  durable=True)
        stream = await channel.declare_queue(
            settings.stream_queue, durable=True, arguments=settings.stream_arguments(),
            robust=False)
        await stream.bind(exchange, "#", robust=False)
        await self._out.open(connection)

    async def publish(self, event: ResultEvent, body: bytes, reply_to: str | None = None) -> None:
        await self.connection.start()
        if not self._gate.ready.is_set():
            await self._gate.writable()
        if event.kind == "final":
            await self._flush(event.id)
            await retrying(self.settings, f"publishing the final result of task {event.id}",
                           lambda: self._finals.commit(event, body, reply_to))
            return
        if self._failed.get(event.id):
            # An earlier event of this task was not confirmed (the connection dropped): it
            # goes out again first, or this one would overtake it, and readers drop a
            # partial that comes after a later one.
            await self._flush(event.id)
        batch = self._batches.get(event.id)
        if event.kind == "partial" and (batch is not None or len(
                self._pending.get(event.id) or ()) >= BATCH_AFTER):
            if batch is None:
                batch = self._batches[event.id] = _Batch(event.task, event.attempt,
                                                         event.seq, reply_to, [])
            batch.bodies.append(body)
            batch.size += len(body)
            if batch.full:
                await self._send_gathered(event.id)
            return
        if batch is not None:  # a status must not overtake the partials before it
            await self._send_gathered(event.id)
        await self._slots.acquire()
        properties, key = envelope(event.id, event.task, event.attempt, event.kind,
                                   event.seq if event.kind == "partial" else event.status,
                                   reply_to)
        self._pipeline(event.id, body, properties, key)

    def _pipeline(self, task_id: str, body: bytes, properties: spec.Basic.Properties,
                  key: str, slotted: bool = True) -> None:
        """Send without waiting for the confirm (``slotted``: a slot of ``_slots`` was
        taken for it). Tasks start in creation order and each writes its frame before
        yielding, so pipelined publishes keep their order on the channel."""
        future = asyncio.ensure_future(self._send(body, properties, key))
        self._pending.setdefault(task_id, deque()).append(
            _Pending(body, properties, key, future))
        future.add_done_callback(lambda _: self._confirmed(task_id, slotted))

    async def _send_gathered(self, task_id: str) -> None:
        await self._slots.acquire()
        if task_id in self._batches:
            self._pipeline(task_id, *self._batch_message(task_id))
        else:  # a confirm sent them while this waited for a slot
            self._slots.release()

    def _batch_message(self, task_id: str) -> tuple[bytes, spec.Basic.Properties, str]:
        """The task's gathered partials as one ``batch`` message, and forget them."""
        batch = self._batches.pop(task_id)
        last = batch.first_seq + len(batch.bodies) - 1
        properties, key = envelope(task_id, batch.task, batch.attempt, "batch",
                                   f"{batch.first_seq}-{last}", batch.reply_to)
        return encode_batch(task_id, batch.task, batch.bodies), properties, key

    async def _send(self, body: bytes, properties: spec.Basic.Properties, key: str,
                    timeout: float | None = None) -> None:
        await self._out.send(self.settings.results_exchange, key, body, properties,
                             mandatory=False, timeout=timeout)

    def _send_with_timeout(self, body: bytes, properties: spec.Basic.Properties,
                           key: str) -> Coroutine[Any, Any, None]:
        return self._send(body, properties, key, timeout=self.settings.publish_timeout)

    def _confirmed(self, task_id: str, slotted: bool) -> None:
        """Forget confirmed events (in order); keep the ones that failed for ``_flush``;
        send gathered partials once few enough are unconfirmed."""
        if slotted:
            self._slots.release()
        queue = self._pending.get(task_id)
        while queue and queue[0].future.done():
            entry = queue.popleft()
            if entry.failed:
                failed = self._failed.setdefault(task_id, [])
                if not failed:
                    log.warning("a pipelined result of task %s was not confirmed (%s); it is "
                                "sent again before the final", task_id,
                                "cancelled" if entry.future.cancelled()
                                else entry.future.exception())
                failed.append(entry)
        if queue is not None and not queue:
            del self._pending[task_id]
        if queue is not None and task_id in self._batches and task_id not in self._failed \
                and len(queue) < BATCH_AFTER:
            # Not slotted: at most one batch per confirm, BATCH_AFTER per task in flight.
            # Only from the live queue: once ``_flush`` took it, the batch is its to send,
            # after the re-sends and before the final.
            self._pipeline(task_id, *self._batch_message(task_id), slotted=False)

    async def _flush(self, task_id: str) -> None:
        """Every earlier event of the task confirmed; failed ones published again."""
        queue = self._pending.pop(task_id, None)
        if queue and not all(p.future.done() for p in queue):
            # Not confirmed within the timeout counts as failed: sent again (a duplicate
            # at worst, which readers drop).
            await asyncio.wait([p.future for p in queue], timeout=self.settings.publish_timeout)
        failed = self._failed.pop(task_id, [])
        failed += [entry for entry in queue or () if not entry.future.done() or entry.failed]
        for entry in failed:
            await self._send_confirmed(f"re-publishing a result of task {task_id}",
                                       entry.body, entry.properties, entry.routing_key)
        if task_id in self._batches:  # gathered after the ones above: sent after them
            await self._send_confirmed(f"publishing results of task {task_id}",
                                       *self._batch_message(task_id))

    async def _send_confirmed(self, what: str, body: bytes, properties: spec.Basic.Properties,
                              key: str) -> None:
        """One publish, its confirm awaited, retried through reconnects."""
        await retrying(self.settings, what, lambda: self._send_with_timeout(
            body, properties, key))

    async def probe(self, message_id: str) -> None:
        """Append an empty ``probe`` message to the stream queue itself (confirmed): a
        replay that reads it back has read everything published before."""
        properties = spec.Basic.Properties(message_id=message_id, message_type="probe",
                                           app_id="qtasks")
        await retrying(self.settings, "marking the end of a result replay",
                       lambda: self._out.send("", self.settings.stream_queue, b"", properties,
                                              mandatory=False,
                                              timeout=self.settings.publish_timeout))

    async def drain(self) -> None:
        """Send gathered partials, then wait (up to ``publish_timeout``) for every
        pipelined publish; then forget them all (before closing)."""
        if self._out.channel is not None:
            for task_id in list(self._batches):
                self._pipeline(task_id, *self._batch_message(task_id), slotted=False)
        pending = [p.future for queue in self._pending.values() for p in queue]
        if pending:
            await asyncio.wait(pending, timeout=self.settings.publish_timeout)
        self._pending.clear()
        self._failed.clear()
        self._batches.clear()
