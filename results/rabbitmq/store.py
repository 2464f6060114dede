"""The RabbitMQ result store (results out), on aio-pika.

Every event is published once, to the topic exchange ``{prefix}.results`` with routing
key ``{task}.{id}`` (dots in the id become ``_``). Bound to it:

- ``{prefix}.results.stream``, a stream queue (``x-max-age`` = the result TTL) bound with
  ``#``: the durable log that ``get`` and ``watch`` of a task this process did not submit
  read, starting at the time in the task's UUIDv7 id (minus ``stream_margin``).
- ``{prefix}.reply.{hex}``, this process's exclusive inbox, once it submits a task. A task
  carries the inbox name as ``reply_to``; the worker names it in the ``BCC`` header
  (RabbitMQ's sender-selected distribution), so the same single publish also lands here
  and ``watch`` of one's own task needs no replay. ``watch`` of another task binds the
  inbox to ``#.{id}`` for as long as it follows it.
- ``{prefix}.listen.{hex}``, one exclusive queue per ``listen``, bound with ``{task}.*``
  (``#`` for every task).

Partials and statuses are pipelined (the publish returns once the frame is written); a
final waits for the confirms of every earlier event of its task, re-publishes any that
failed, and is itself confirmed before ``publish`` returns, because the worker acks the
task right after.

Finals are group-committed: the finals of different tasks that are ready while
``FINALS_IN_FLIGHT`` final messages await their confirm go out together as one ``batch``
message, routed with every task's key (the first as routing key, the others in the
``CC`` header, the submitters' inboxes in ``BCC``). Each of its tasks is acked only after
that message is confirmed, exactly as for a final sent alone; under load the broker
stores and routes one message per group instead of one per task.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiormq import spec
from aiormq.abc import DeliveredMessage

from qtasks.brokers.rabbitmq.connection import (
    AmqpSettings,
    connect,
    connection_name,
    quietly,
    raise_if_refused,
    retrying,
    send,
)
from qtasks.errors import BrokerUnavailableError, MessageDecodeError, QTasksError
from qtasks.interfaces import ResultStore
from qtasks.protocol import ResultEvent, decode_results, encode_batch, uuid7_time

log = logging.getLogger("qtasks.rabbitmq")

#: Unconfirmed pipelined publishes per store; past it ``publish`` waits (backpressure).
MAX_IN_FLIGHT = 1000
#: Buffers of submitted tasks nobody watches are dropped after this many seconds idle,
#: beyond this many buffers, or beyond this many events each; a later ``watch`` then
#: replays the stream instead. Bounded memory whatever the producer does.
BUFFER_IDLE_S = 300.0
MAX_BUFFERS = 10_000
MAX_UNWATCHED_EVENTS = 10_000
#: A task with this many result messages unconfirmed gathers its next partials into one
#: ``batch`` message, sent as soon as fewer are unconfirmed (or before any other event of
#: the task). Below it every partial goes out at once: batching adds no latency at a low
#: yield rate, and at a high one the broker handles one message per batch, not per value.
BATCH_AFTER = 8
BATCH_MAX_EVENTS = 1000
BATCH_MAX_BYTES = 256 * 1024
#: Final messages awaiting their confirm before the next finals wait and go out together.
#: A final that finds fewer in flight leaves at once (at the end of the event-loop turn,
#: with the finals of that turn): grouping costs no latency at a low rate.
FINALS_IN_FLIGHT = 1
FINALS_MAX_EVENTS = 256
FINALS_MAX_BYTES = 256 * 1024
#: The routing keys of a group travel in its content header, which must fit one frame.
FINALS_MAX_KEY_BYTES = 32 * 1024
#: Events already read by every watcher are dropped once a buffer holds this many.
TRIM_AT = 1024
STREAM_PREFETCH = 1000
LISTEN_PREFETCH = 1000
#: A listener that falls this far behind loses its oldest events, not the broker's memory.
LISTEN_MAX_LENGTH = 100_000


#: A task id JSON writes verbatim (no escapes), so that its bytes are in the body as is.
_VERBATIM = re.compile(r'^[ -!#-\[\]-~]*$')


def _word(task_id: str) -> str:
    """The id as one topic word, so that ``{task}.*`` and ``#.{id}`` bindings match."""
    return task_id.replace(".", "_")


def routing_key(task: str, task_id: str) -> str:
    return f"{task}.{_word(task_id)}"


def _events_of(body: bytes, about: str | None) -> list[ResultEvent]:
    """The events of one result message; none (and an error logged) if it is undecodable:
    one bad message must not stop a reader."""
    try:
        return decode_results(body)
    except MessageDecodeError as exc:
        log.error("skipping an undecodable result message (of %s): %s",
                  about or "several tasks", exc)
        return []


async def _ignore(_message: DeliveredMessage) -> None:
    return None


class _Interrupted(Exception):
    """The connection dropped while reading the stream: start over after reconnecting."""


class _LostAgain(Exception):
    """The inbox was lost again while its events were being recovered."""


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


@dataclass(slots=True)
class _Final:
    """A final waiting for its group's confirm."""

    event: ResultEvent
    body: bytes
    reply_to: str | None
    key: str  # its routing key
    stored: asyncio.Future[None]


class _Buffer:
    """Events of one task, as they arrive on this process's inbox, for its watchers.

    ``complete``: it holds every event of the task from the first (its submitter called
    ``expect`` before publishing, and nothing was trimmed), so watching it needs no
    replay. ``gap``: the connection dropped and the events published meanwhile are still
    being recovered from the stream; watchers wait. While recovering, live events are
    ``held`` so that they come after the recovered ones. Each watcher keeps a cursor;
    events behind every cursor are trimmed.
    """

    __slots__ = ("bound", "changed", "complete", "cursors", "events", "final", "first", "gap",
                 "held", "touched")

    def __init__(self, complete: bool, gap: bool) -> None:
        self.events: list[ResultEvent] = []
        self.first = 0  # position of events[0] among every event this buffer received
        self.complete = complete
        self.gap = gap
        self.held: list[ResultEvent] | None = [] if gap else None
        self.changed = asyncio.Event()
        self.cursors: dict[int, int] = {}
        self.bound = False
        self.touched = time.monotonic()
        self.final: ResultEvent | None = None

    def receive(self, event: ResultEvent) -> None:
        if self.held is not None:
            self.held.append(event)
        else:
            self.add(event)

    def add(self, event: ResultEvent) -> None:
        self.events.append(event)
        self.touched = time.monotonic()
        if event.kind == "final":
            self.final = event
        if not self.cursors and len(self.events) > MAX_UNWATCHED_EVENTS:
            self.forget(len(self.events))
        self.wake()

    def recovered(self) -> None:
        """The gap is filled: what arrived live meanwhile follows the recovered events."""
        for event in self.held or ():
            self.add(event)
        self.held = None
        self.gap = False
        self.wake()

    def wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def forget(self, count: int) -> None:
        del self.events[:count]
        self.first += count
        self.complete = False

    def trim(self) -> None:
        if len(self.events) >= TRIM_AT and self.cursors:
            self.forget(min(self.cursors.values()) - self.first)


class _Seen:
    """Drops events a watcher already yielded (a replay and the inbox overlap)."""

    def __init__(self) -> None:
        self.partial: tuple[int, int] = (0, -1)
        self.others: set[tuple[str, int, str | None]] = set()

    def first(self, event: ResultEvent) -> bool:
        if event.kind == "partial":
            key = (event.attempt, event.seq)
            if key <= self.partial:
                return False
            self.partial = key
            return True
        other = (event.kind, event.attempt, event.status)
        if other in self.others:
            return False
        self.others.add(other)
        return True


class RabbitMQResultStore(ResultStore):
    """Results over RabbitMQ: ``RabbitMQResultStore("amqp://...?prefix=app&ttl=3600")``."""

    def __init__(self, url: str = "amqp://guest:guest@localhost/", **options: Any) -> None:
        self.settings = AmqpSettings.parse(url, options)
        self.url = self.settings.display_url
        #: As RabbitMQ lists the connection (``rabbitmqctl list_connections``).
        self.connection_name = connection_name(self.settings, "results")
        self.ttl = self.settings.ttl
        self._inbox_name = self.settings.private_queue("reply")
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._inbox: AbstractQueue | None = None
        self._buffers: dict[str, _Buffer] = {}
        self._pending: dict[str, deque[_Pending]] = {}
        self._failed: dict[str, list[_Pending]] = {}
        self._batches: dict[str, _Batch] = {}
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._finals: deque[_Final] = deque()
        self._finals_in_flight = 0
        self._finals_scheduled = False
        self._restored = asyncio.Event()
        #: Set while the stream queue takes writes; see ``_await_stream``.
        self._stream_ready = asyncio.Event()
        self._inbox_channel: AbstractRobustChannel | None = None
        self._inbox_up = False
        self._inbox_losses = 0
        #: When the connection was lost, until the events of that outage are recovered.
        self._lost_at: float | None = None
        self._closed = False
        self._lock = asyncio.Lock()
        self._bind_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._watchers = itertools.count()
        self._last_sweep = 0.0
        #: How often the connection was re-established (for logs, metrics and tests).
        self.reconnects = 0

    def __repr__(self) -> str:
        return f"<RabbitMQResultStore {self.url} prefix={self.settings.prefix}>"

    @property
    def reply_address(self) -> str:
        """The inbox's binding key; the worker puts it in the ``BCC`` header."""
        return self._inbox_name

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._connection is not None:
            return
        async with self._lock:
            if self._connection is not None:
                return
            settings = self.settings
            connection = await connect(settings, self.connection_name)
            try:
                channel = await connection.channel()
                exchange = await channel.declare_exchange(settings.results_exchange, "topic",
                                                          durable=True)
                stream = await channel.declare_queue(
                    settings.stream_queue, durable=True,
                    arguments=settings.stream_arguments(), robust=False)
                await stream.bind(exchange, "#", robust=False)
            except BaseException as exc:
                await connection.close()
                raise_if_refused(exc, settings)
                raise
            connection.close_callbacks.add(self._on_lost)
            connection.reconnect_callbacks.add(self._on_restored)
            self._channel = channel
            self._connection = connection
            self._closed = False
            self._restored.set()
            self._stream_ready.set()

    async def close(self) -> None:
        """Send gathered partials, wait (up to ``publish_timeout``) for pipelined
        publishes, then disconnect."""
        if self._channel is not None:
            for task_id in list(self._batches):
                self._pipeline(task_id, *self._batch_message(task_id), slotted=False)
        pending = [p.future for queue in self._pending.values() for p in queue]
        if pending:
            await asyncio.wait(pending, timeout=self.settings.publish_timeout)
        self._closed = True
        for buffer in self._buffers.values():
            buffer.wake()
        for task in list(self._background):
            task.cancel()
        connection, self._connection = self._connection, None
        self._inbox = self._inbox_channel = None
        self._inbox_up = False
        self._buffers.clear()
        self._pending.clear()
        self._failed.clear()
        self._batches.clear()
        if connection is not None:
            await connection.close()

    def _on_lost(self, _connection: object, _exc: BaseException | None) -> None:
        self._restored.clear()
        self._stream_ready.clear()

    def _on_restored(self, _connection: object) -> None:
        self._restored.set()
        self._spawn(self._await_stream())
        self.reconnects += 1

    async def _await_stream(self) -> None:
        """Set ``_stream_ready`` once a consumer can attach to the stream queue again.

        Right after a RabbitMQ node restarts, clients reconnect before the node runs its
        stream queues; for that moment a publish routed to the stream is confirmed and
        dropped (3.10; a consumer gets NOT_FOUND "home node ... is down"). So after a
        reconnect, results wait until the stream answers a consumer."""
        pause = 0.05
        while not self._closed and self._connection is not None:
            if self._stream_ready.is_set():
                return
            try:
                channel = await self._connection.channel(publisher_confirms=False)
                try:
                    underlay = await channel.get_underlay_channel()
                    await underlay.basic_qos(prefetch_count=1)
                    ok = await underlay.basic_consume(
                        self.settings.stream_queue, _ignore,
                        arguments={"x-stream-offset": "next"})
                    await underlay.basic_cancel(ok.consumer_tag or "")
                finally:
                    await quietly(channel.close())
            except Exception as exc:
                log.debug("result stream not readable yet (%s); waiting", exc)
                await asyncio.sleep(pause)
                pause = min(1.0, pause * 2)
                continue
            if self._restored.is_set():
                self._stream_ready.set()
            return

    async def _stream_writable(self) -> None:
        """Wait (up to ``publish_timeout``) for ``_stream_ready``; past that, publish
        anyway rather than stall the worker, and say so."""
        try:
            await asyncio.wait_for(self._stream_ready.wait(), self.settings.publish_timeout)
        except TimeoutError:
            log.warning("the result stream %s did not come back within %g s after a "
                        "reconnect; publishing anyway", self.settings.stream_queue,
                        self.settings.publish_timeout)
            self._stream_ready.set()  # given up for this outage; the next loss clears it

    def _inbox_lost(self, _channel: object, _exc: BaseException | None) -> None:
        """The inbox channel closed (with the connection, or alone): until it consumes
        again, what is published reaches only the stream."""
        if self._closed:
            return
        self._inbox_up = False
        self._inbox_losses += 1
        if self._lost_at is None:
            self._lost_at = time.time()
        for buffer in self._buffers.values():
            buffer.gap = True
            if buffer.held is None:
                # Until the gap is filled, what arrives is held back, to follow the
                # recovered events.
                buffer.held = []
            buffer.wake()

    def _inbox_reopened(self, _channel: object) -> None:
        self._spawn(self._resume_inbox())

    async def _resume_inbox(self) -> None:
        """Consume the re-declared inbox again, then fill every buffer's gap with one read
        of the stream from the moment it was lost (not one replay per watcher)."""
        losses = self._inbox_losses
        try:
            await self._consume_inbox()
        except Exception as exc:
            log.warning("could not consume the result inbox again (%s); retrying on the "
                        "next reconnect", exc)
            return
        self._inbox_up = True
        gapped = {task_id: b for task_id, b in self._buffers.items() if b.gap}
        lost_at = self._lost_at
        try:
            if gapped and lost_at is not None:
                start = lost_at - self.settings.stream_margin
                async for event in self._replay_retrying(set(gapped), start,
                                                         "recovering results after a reconnect",
                                                         losses):
                    gapped[event.id].add(event)
        except _LostAgain:
            return  # the next reopen recovers from the first loss
        except Exception:
            log.exception("recovering results after a reconnect failed; watchers replay")
            for buffer in gapped.values():
                buffer.complete = False  # its next watcher replays from the task's start
        if losses == self._inbox_losses:
            self._lost_at = None
        for buffer in gapped.values():
            buffer.recovered()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _live(self) -> AbstractRobustConnection:
        if self._closed or self._connection is None:
            raise QTasksError("the RabbitMQ result store is closed")
        return self._connection

    # -- publishing --------------------------------------------------------------------

    async def publish(self, event: ResultEvent, body: bytes, reply_to: str | None = None) -> None:
        await self.start()
        if not self._stream_ready.is_set():
            await self._stream_writable()
        if event.kind == "final":
            await self._flush(event.id)
            await retrying(self.settings, f"publishing the final result of task {event.id}",
                           lambda: self._commit_final(event, body, reply_to))
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
        properties, key = self._envelope(event.id, event.task, event.attempt, event.kind,
                                         event.seq if event.kind == "partial" else event.status,
                                         reply_to)
        self._pipeline(event.id, body, properties, key)

    def _envelope(self, task_id: str, task: str, attempt: int, kind: str, detail: object,
                  reply_to: str | None) -> tuple[spec.Basic.Properties, str]:
        headers: dict[str, Any] = {"x-qtasks-task": task, "x-qtasks-attempt": attempt}
        if reply_to:
            headers["BCC"] = [reply_to]  # also to the submitter's inbox; stripped on delivery
        properties = spec.Basic.Properties(
            delivery_mode=2, content_type="application/json", correlation_id=task_id,
            message_type=kind, app_id="qtasks", headers=headers,
            message_id=f"{task_id}.{attempt}.{kind}.{detail}")
        return properties, routing_key(task, task_id)

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
        properties, key = self._envelope(task_id, batch.task, batch.attempt, "batch",
                                         f"{batch.first_seq}-{last}", batch.reply_to)
        return encode_batch(task_id, batch.task, batch.bodies), properties, key

    async def _send(self, body: bytes, properties: spec.Basic.Properties, key: str,
                    timeout: float | None = None) -> None:
        if self._channel is None:
            raise QTasksError("the RabbitMQ result store is not started")
        await send(self._channel, self.settings.results_exchange, key, body, properties,
                   mandatory=False, timeout=timeout)

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

    async def _commit_final(self, event: ResultEvent, body: bytes,
                            reply_to: str | None) -> None:
        """Returns once the final is confirmed, alone or in a group (see the module's
        docstring); raises what its group's publish raised."""
        final = _Final(event, body, reply_to, routing_key(event.task, event.id),
                       asyncio.get_running_loop().create_future())
        self._finals.append(final)
        self._schedule_finals()
        await final.stored

    def _schedule_finals(self) -> None:
        if self._finals and not self._finals_scheduled \
                and self._finals_in_flight < FINALS_IN_FLIGHT:
            self._finals_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_finals)

    def _send_finals(self) -> None:
        """Publish the waiting finals (as many as one message takes) without waiting for
        the confirm; ``_finals_sent`` settles them."""
        self._finals_scheduled = False
        group: list[_Final] = []
        size = keys = 0
        while self._finals and len(group) < FINALS_MAX_EVENTS:
            final = self._finals[0]
            key_size = len(final.key) + len(final.reply_to or "") + 16
            if group and (size + len(final.body) > FINALS_MAX_BYTES
                          or keys + key_size > FINALS_MAX_KEY_BYTES):
                break
            self._finals.popleft()
            if not final.stored.done():  # not abandoned by a cancelled publish
                group.append(final)
                size += len(final.body)
                keys += key_size
        if not group:
            return
        body, properties, key = self._finals_message(group)
        self._finals_in_flight += 1
        sent = asyncio.ensure_future(self._send(body, properties, key,
                                                timeout=self.settings.publish_timeout))
        sent.add_done_callback(lambda done: self._finals_sent(group, done))
        self._schedule_finals()

    def _finals_message(self, group: list[_Final]) -> tuple[bytes, spec.Basic.Properties, str]:
        first = group[0]
        if len(group) == 1:
            event = first.event
            properties, key = self._envelope(event.id, event.task, event.attempt, "final",
                                             event.status, first.reply_to)
            return first.body, properties, key
        keys = list(dict.fromkeys(f.key for f in group))
        replies = list(dict.fromkeys(f.reply_to for f in group if f.reply_to))
        headers: dict[str, Any] = {"CC": keys[1:]}
        if replies:
            headers["BCC"] = replies
        properties = spec.Basic.Properties(
            delivery_mode=2, content_type="application/json", message_type="batch",
            app_id="qtasks", headers=headers,
            message_id=f"{first.event.id}.{first.event.attempt}.finals.{len(group)}")
        return encode_batch(None, None, [f.body for f in group]), properties, keys[0]

    def _finals_sent(self, group: list[_Final], sent: asyncio.Future[None]) -> None:
        self._finals_in_flight -= 1
        # A publish cancelled under it (the loop shutting down) is a failed send to each
        # waiter, which ``retrying`` may send again; not a cancellation of its task.
        error = ConnectionError("the publish of a group of finals was cancelled") \
            if sent.cancelled() else sent.exception()
        for final in group:
            if final.stored.done():
                continue
            if error is None:
                final.stored.set_result(None)
            else:
                final.stored.set_exception(error)
        self._schedule_finals()

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
        await retrying(self.settings, what, lambda: self._send(
            body, properties, key, timeout=self.settings.publish_timeout))

    # -- the inbox -----------------------------------------------------------------------

    async def _ensure_inbox(self) -> AbstractQueue:
        if self._inbox is not None:
            return self._inbox
        async with self._lock:
            if self._inbox is None:
                channel = await self._live().channel()
                # Robust: declared and bound again when the channel reopens, after which
                # ``_inbox_reopened`` consumes it again.
                inbox = await channel.declare_queue(self._inbox_name, exclusive=True,
                                                    auto_delete=True)
                await inbox.bind(self.settings.results_exchange, self._inbox_name)
                self._inbox_channel = channel
                await self._consume_inbox()
                channel.close_callbacks.add(self._inbox_lost)
                channel.reopen_callbacks.add(self._inbox_reopened)
                self._inbox_up = True
                self._inbox = inbox
            return self._inbox

    async def _consume_inbox(self) -> None:
        """With aiormq directly: aio-pika's message wrapper costs more than the rest of
        handling an event, and a submitter receives two or more per task."""
        assert self._inbox_channel is not None
        underlay = await self._inbox_channel.get_underlay_channel()
        await underlay.basic_consume(self._inbox_name, self._on_inbox, no_ack=True)

    async def _on_inbox(self, message: DeliveredMessage) -> None:
        task_id = message.header.properties.correlation_id
        if task_id is not None and task_id not in self._buffers:
            return  # a task nobody here waits for (any more)
        for event in _events_of(message.body, task_id):
            if (buffer := self._buffers.get(event.id)) is not None:
                buffer.receive(event)

    async def expect(self, task_id: str) -> None:
        await self.start()
        await self._ensure_inbox()
        self._sweep()
        if task_id not in self._buffers:
            self._buffers[task_id] = _Buffer(complete=True, gap=not self._inbox_up)

    async def _follow(self, task_id: str) -> _Buffer:
        """A buffer for a task this process did not submit: its events reach the inbox
        through a ``#.{id}`` binding, made before the replay starts so nothing falls
        between the two."""
        inbox = await self._ensure_inbox()
        async with self._bind_lock:
            buffer = self._buffers.get(task_id)
            if buffer is None:
                buffer = _Buffer(complete=False, gap=not self._inbox_up)
                await inbox.bind(self.settings.results_exchange, f"#.{_word(task_id)}")
                buffer.bound = True
                self._buffers[task_id] = buffer
            return buffer

    def _discard(self, task_id: str, buffer: _Buffer) -> None:
        if self._buffers.get(task_id) is buffer:
            del self._buffers[task_id]
        if buffer.bound and self._inbox is not None:
            buffer.bound = False
            inbox = self._inbox

            self._spawn(quietly(inbox.unbind(self.settings.results_exchange,
                                             f"#.{_word(task_id)}")))

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep < 1.0 and len(self._buffers) <= MAX_BUFFERS:
            return
        self._last_sweep = now
        idle = sorted((b.touched, task_id) for task_id, b in self._buffers.items()
                      if not b.cursors)
        excess = len(self._buffers) - MAX_BUFFERS
        for index, (touched, task_id) in enumerate(idle):
            if index >= excess and now - touched < BUFFER_IDLE_S:
                break
            self._discard(task_id, self._buffers[task_id])

    # -- reading -------------------------------------------------------------------------

    async def watch(self, task_id: str) -> AsyncIterator[ResultEvent]:
        await self.start()
        buffer = self._buffers.get(task_id) or await self._follow(task_id)
        me = next(self._watchers)
        buffer.cursors[me] = buffer.first
        seen = _Seen()
        try:
            if not (buffer.complete and buffer.first == 0):
                # Not submitted here (or trimmed): the stream has the events up to now,
                # the buffer (bound before the replay began) everything after.
                async for event in self._replay_task(task_id):
                    if seen.first(event):
                        if event.kind == "final":
                            self._discard(task_id, buffer)
                        yield event
                        if event.kind == "final":
                            return
            while True:
                self._live()
                cursor = buffer.cursors[me]
                if buffer.gap or cursor - buffer.first >= len(buffer.events):
                    await buffer.changed.wait()
                    continue
                event = buffer.events[cursor - buffer.first]
                buffer.cursors[me] = cursor + 1
                buffer.trim()
                if seen.first(event):
                    if event.kind == "final":
                        self._discard(task_id, buffer)  # consumed: memory back
                    yield event
                    if event.kind == "final":
                        return
        finally:
            buffer.cursors.pop(me, None)
            if buffer.bound and not buffer.cursors:
                self._discard(task_id, buffer)

    async def get(self, task_id: str) -> ResultEvent | None:
        await self.start()
        buffer = self._buffers.get(task_id)
        if buffer is not None and buffer.final is not None:
            return buffer.final
        latest: ResultEvent | None = None
        async for event in self._replay_task(task_id):
            if event.kind != "partial":
                latest = event
        return latest

    def _replay_task(self, task_id: str) -> AsyncIterator[ResultEvent]:
        """The events of one task in the stream, from its id's time."""
        created = uuid7_time(task_id)
        start = None if created is None else created - self.settings.stream_margin
        return self._replay_retrying({task_id}, start, f"reading results of task {task_id}")

    async def _replay_retrying(self, task_ids: set[str], start: float | None, what: str,
                               losses: int | None = None) -> AsyncIterator[ResultEvent]:
        """``_replay``, started over (duplicates and all: readers de-duplicate) when it is
        interrupted, for up to ``publish_timeout``.

        Interrupted means the connection dropped, or the stream is not readable yet: right
        after a node restarts, a stream queue answers NOT_FOUND ("home node ... is down")
        for a moment after clients have reconnected. With ``losses`` given, a new loss of
        the inbox ends the retries with ``_LostAgain``: its own recovery takes over.
        """
        deadline = time.monotonic() + self.settings.publish_timeout
        pause = 0.05
        while True:
            try:
                async for event in self._replay(task_ids, start):
                    yield event
                return
            except _Interrupted as exc:
                if losses is not None and losses != self._inbox_losses:
                    raise _LostAgain from exc
                if time.monotonic() + pause > deadline:
                    raise BrokerUnavailableError(
                        f"{what}: RabbitMQ did not serve the result stream within "
                        f"{self.settings.publish_timeout:g} s") from exc.__cause__
                log.debug("%s interrupted (%s); starting over", what, exc.__cause__)
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    while not self._restored.is_set():
                        self._live()
                        await self._restored.wait()
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
        connection = self._live()
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
                    for event in _events_of(message.body, properties.correlation_id):
                        if event.id in task_ids:
                            yield event
        except _Interrupted:
            raise
        except Exception as exc:
            if self._connection is None or channel.is_closed:
                raise _Interrupted from exc
            raise
        finally:
            await quietly(channel.close())

    async def _probe(self, probe: str) -> None:
        channel = self._channel
        if channel is None:
            raise QTasksError("the RabbitMQ result store is not started")
        properties = spec.Basic.Properties(message_id=probe, message_type="probe",
                                           app_id="qtasks")
        await retrying(self.settings, "marking the end of a result replay",
                       lambda: send(channel, "", self.settings.stream_queue, b"", properties,
                                    mandatory=False, timeout=self.settings.publish_timeout))

    # -- live subscriptions --------------------------------------------------------------

    async def listen(self, task_name: str) -> AsyncIterator[ResultEvent]:
        await self.start()
        channel = await self._live().channel()
        received: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

        async def receive(message: AbstractIncomingMessage) -> None:
            received.put_nowait(message)

        try:
            await channel.set_qos(prefetch_count=LISTEN_PREFETCH)
            # Robust: after a reconnect it is declared, bound and consumed again (events
            # published while the connection was down are not seen: live means live).
            queue = await channel.declare_queue(
                self.settings.private_queue("listen"), exclusive=True, auto_delete=True,
                arguments={"x-max-length": LISTEN_MAX_LENGTH, "x-overflow": "drop-head"})
            await queue.bind(self.settings.results_exchange,
                             "#" if task_name == "*" else f"{task_name}.*")
            tag = await queue.consume(receive)
        except BaseException:
            await quietly(channel.close())
            raise
        return self._listening(channel, queue, tag, received, task_name)

    async def _listening(self, channel: AbstractRobustChannel, queue: AbstractQueue, tag: str,
                         received: asyncio.Queue[AbstractIncomingMessage], task_name: str,
                         ) -> AsyncIterator[ResultEvent]:
        unacked = 0
        try:
            while True:
                message = await received.get()
                unacked += 1
                if unacked >= LISTEN_PREFETCH // 4 or received.empty():
                    with contextlib.suppress(Exception):  # from a channel that has died
                        await message.ack(multiple=True)
                    unacked = 0
                for event in _events_of(message.body, task_name):
                    if task_name in ("*", event.task):  # a group of finals holds others
                        yield event
        finally:
            # Cancelled first, so that the robust channel does not restore the consumer;
            # the queue (auto-delete) goes with it.
            if not self._closed:
                await quietly(queue.cancel(tag))
                await quietly(queue.delete(if_unused=False, if_empty=False))
                await quietly(channel.close())


