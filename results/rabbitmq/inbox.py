"""This process's result inbox ``{prefix}.reply.{hex}``, and watching a task through it.

Once this process submits a task it declares an exclusive inbox; a task carries its name
as ``reply_to``, the worker names it in the ``BCC`` header (RabbitMQ's sender-selected
distribution), so the single publish of each result also lands here and ``watch`` of
one's own task needs no replay. ``watch`` of another task binds the inbox to ``#.{id}``
for as long as it follows it, before replaying the stream, so nothing falls between.

When the inbox's channel is lost, what is published meanwhile reaches only the stream:
after the reconnect, one read of the stream from the moment of the loss fills every
buffer's gap (not one replay per watcher).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator

from aio_pika.abc import AbstractQueue, AbstractRobustChannel
from aiormq.abc import DeliveredMessage

from qtasks.brokers.rabbitmq.connection import AmqpConnection, Background, quietly
from qtasks.brokers.rabbitmq.settings import topic_word
from qtasks.protocol import PartialOrder, ResultEvent, read_results
from qtasks.results.rabbitmq.buffer import TaskBuffer
from qtasks.results.rabbitmq.reads import SharedReads
from qtasks.results.rabbitmq.replay import ReplayAbandoned, ReplayReader

log = logging.getLogger(__name__)

#: Buffers of submitted tasks nobody watches are dropped after this many seconds idle or
#: beyond this many buffers; a later ``watch`` then replays the stream instead.
BUFFER_IDLE_S = 300.0
MAX_BUFFERS = 10_000


class ResultInbox:
    """The inbox queue and its consumer, the buffers of the tasks followed through it,
    and their recovery after the inbox was lost."""

    def __init__(self, connection: AmqpConnection, replay: ReplayReader,
                 background: Background) -> None:
        self.connection = connection
        self.settings = connection.settings
        self.name = self.settings.private_queue("reply")
        self._replay = replay
        #: Replays of the tasks watched, shared with those asked at the same time.
        self.reads = SharedReads(replay, self.settings.stream_margin)
        self._background = background
        self._buffers: dict[str, TaskBuffer] = {}
        self._queue: AbstractQueue | None = None
        self._channel: AbstractRobustChannel | None = None
        self._up = False
        self._losses = 0
        #: When the inbox was lost, until the events of that outage are recovered.
        self._lost_at: float | None = None
        self._lock = asyncio.Lock()
        self._bind_lock = asyncio.Lock()
        self._watchers = itertools.count()
        self._last_sweep = 0.0

    def final_of(self, task_id: str) -> ResultEvent | None:
        """The final of a task, if this inbox has received it."""
        buffer = self._buffers.get(task_id)
        return buffer.final if buffer is not None else None

    async def _ensure(self) -> AbstractQueue:
        if self._queue is not None:
            return self._queue
        async with self._lock:
            if self._queue is None:
                channel = await self.connection.live.channel()
                # Robust: declared and bound again when the channel reopens, after which
                # ``_reopened`` consumes it again.
                inbox = await channel.declare_queue(self.name, exclusive=True,
                                                    auto_delete=True)
                await inbox.bind(self.settings.results_exchange, self.name)
                self._channel = channel
                await self._consume()
                channel.close_callbacks.add(self._lost)
                channel.reopen_callbacks.add(self._reopened)
                self._up = True
                self._queue = inbox
            return self._queue

    async def _consume(self) -> None:
        """With aiormq directly: aio-pika's message wrapper costs more than the rest of
        handling an event, and a submitter receives two or more per task."""
        assert self._channel is not None
        underlay = await self._channel.get_underlay_channel()
        await underlay.basic_consume(self.name, self._on_message, no_ack=True)

    async def _on_message(self, message: DeliveredMessage) -> None:
        task_id = message.header.properties.correlation_id
        if task_id is not None and task_id not in self._buffers:
            return  # a task nobody here waits for (any more)
        for event in read_results(message.body, "RabbitMQ result inbox"):
            if (buffer := self._buffers.get(event.id)) is not None:
                buffer.receive(event)

    async def expect(self, task_id: str) -> None:
        await self._ensure()
        self._sweep()
        if task_id not in self._buffers:
            self._buffers[task_id] = TaskBuffer(complete=True, gap=not self._up)

    async def _follow(self, task_id: str) -> TaskBuffer:
        """A buffer for a task this process did not submit: its events reach the inbox
        through a ``#.{id}`` binding, made before the replay starts so nothing falls
        between the two."""
        inbox = await self._ensure()
        async with self._bind_lock:
            buffer = self._buffers.get(task_id)
            if buffer is None:
                buffer = TaskBuffer(complete=False, gap=not self._up)
                await inbox.bind(self.settings.results_exchange, f"#.{topic_word(task_id)}")
                buffer.bound = True
                self._buffers[task_id] = buffer
            return buffer

    def _discard(self, task_id: str, buffer: TaskBuffer) -> None:
        if self._buffers.get(task_id) is buffer:
            del self._buffers[task_id]
        if buffer.bound and self._queue is not None:
            buffer.bound = False
            self._background.spawn(quietly(self._queue.unbind(
                self.settings.results_exchange, f"#.{topic_word(task_id)}")))

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

    async def watch(self, task_id: str) -> AsyncIterator[ResultEvent]:
        """The task's events: from the buffer alone when it holds them all from the
        first, else the stream's up to now, then the buffer's. A partial is yielded at
        most once (``PartialOrder``); a status may come from both."""
        await self.connection.start()
        buffer = self._buffers.get(task_id) or await self._follow(task_id)
        me = next(self._watchers)
        buffer.cursors[me] = buffer.first
        order = PartialOrder()
        try:
            if not (buffer.complete and buffer.first == 0):
                # Not submitted here (or trimmed): the stream has the events up to now,
                # the buffer (bound before the replay began) everything after.
                for event in await self.reads.read([task_id], "final"):
                    if order.take(event):
                        if event.kind == "final":
                            self._discard(task_id, buffer)
                        yield event
                        if event.kind == "final":
                            return
            while True:
                self.connection.live  # noqa: B018 - raises once the store is closed
                cursor = buffer.cursors[me]
                if buffer.gap or cursor - buffer.first >= len(buffer.events):
                    await buffer.changed.wait()
                    continue
                event = buffer.events[cursor - buffer.first]
                buffer.cursors[me] = cursor + 1
                buffer.trim()
                if order.take(event):
                    if event.kind == "final":
                        self._discard(task_id, buffer)  # consumed: memory back
                    yield event
                    if event.kind == "final":
                        return
        finally:
            buffer.cursors.pop(me, None)
            if buffer.bound and not buffer.cursors:
                self._discard(task_id, buffer)

    # -- losing the inbox and recovering what it missed ----------------------------------

    def _lost(self, _channel: object, _exc: BaseException | None) -> None:
        """The inbox channel closed (with the connection, or alone): until it consumes
        again, what is published reaches only the stream."""
        if self.connection.robust is None:
            return  # the store is closing
        self._up = False
        self._losses += 1
        if self._lost_at is None:
            self._lost_at = time.time()
        for buffer in self._buffers.values():
            buffer.gap = True
            if buffer.held is None:
                # Until the gap is filled, what arrives is held back, to follow the
                # recovered events.
                buffer.held = []
            buffer.wake()

    def _reopened(self, _channel: object) -> None:
        self._background.spawn(self._resume())

    async def _resume(self) -> None:
        """Consume the re-declared inbox again, then fill every buffer's gap with one read
        of the stream from the moment it was lost."""
        losses = self._losses
        try:
            await self._consume()
        except Exception as exc:
            log.warning("could not consume the result inbox again (%s); retrying on the "
                        "next reconnect", exc)
            return
        self._up = True
        gapped = {task_id: b for task_id, b in self._buffers.items() if b.gap}
        lost_at = self._lost_at
        try:
            if gapped and lost_at is not None:
                start = lost_at - self.settings.stream_margin
                async for event in self._replay.retrying(
                        set(gapped), start, "recovering results after a reconnect",
                        abandon=lambda: losses != self._losses):
                    gapped[event.id].add(event)
        except ReplayAbandoned:
            return  # the next reopen recovers from the first loss
        except Exception:
            log.exception("recovering results after a reconnect failed; watchers replay")
            for buffer in gapped.values():
                buffer.complete = False  # its next watcher replays from the task's start
        if losses == self._losses:
            self._lost_at = None
        for buffer in gapped.values():
            buffer.recovered()

    def close(self) -> None:
        """Wake every watcher (to find the store closed) and forget the inbox."""
        for buffer in self._buffers.values():
            buffer.wake()
        self._queue = self._channel = None
        self._up = False
        self._buffers.clear()
