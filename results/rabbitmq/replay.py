"""Reading past results back from the stream queue ``{prefix}.results.stream``.

The stream (``x-max-age`` = the result TTL, bound to the results exchange with ``#``) is
the durable log that ``get`` and ``watch`` of a task this process did not submit read,
and from which the inbox recovers what it missed while its connection was down. A read
starts at a time (a task id's UUIDv7 time minus ``stream_margin``) or at an offset the
``StreamIndex`` knows, and ends at a probe message it appends (everything published
before the call has then been read), or as soon as the final it is after is read.
Every read feeds the index (index.py), which is what keeps ``get`` from costing in
proportion to the stream.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import DeliveredMessage

from qtasks.brokers.rabbitmq.connection import AmqpConnection, quietly
from qtasks.errors import BrokerUnavailableError
from qtasks.protocol import ResultEvent, read_results, uuid7_time
from qtasks.results.rabbitmq.index import StreamIndex

log = logging.getLogger(__name__)

STREAM_PREFETCH = 1000
#: For a read that may jump: what the broker has sent ahead of a jump is parsed for
#: nothing (a whole prefetch each time).
JUMPING_PREFETCH = 100
#: A task id JSON writes verbatim (no escapes), so that its bytes are in the body as is.
_VERBATIM = re.compile(r'^[ -!#-\[\]-~]*$')


class _Interrupted(Exception):
    """The connection dropped while reading the stream: start over after reconnecting."""


class ReplayAbandoned(Exception):
    """A replay given up because its caller said so (the inbox it was recovering for was
    lost again: that loss's own recovery takes over)."""


@dataclass(slots=True)
class Start:
    """Where a read begins: at a time (Unix seconds; None: the oldest retained), or at
    an offset; ``jump``: past each range the index has read when the read reaches it."""

    time: float | None = None
    offset: int | None = None
    jump: bool = False
    #: Read again from this time the tasks the read found nothing of (``start_for``),
    #: or (``verify_first``) those whose first event it found is not their first.
    fallback: float | None = None
    verify_first: bool = False

    def argument(self) -> Any:
        if self.offset is not None:
            return self.offset
        if self.time is None:
            return "first"
        return datetime.fromtimestamp(max(0.0, self.time), UTC)


class ReplayReader:
    """Reads the events of some tasks from the stream, each read on a channel of its own,
    up to a probe message it appends (``probe``, sent by the publisher's channel)."""

    def __init__(self, connection: AmqpConnection,
                 probe: Callable[[str], Awaitable[None]]) -> None:
        self.connection = connection
        self.settings = connection.settings
        self._probe = probe
        #: What this process's reads have learnt of where tasks' events are.
        self.index = StreamIndex(self.settings.stream_margin)
        #: Stream messages read so far (what reads cost: for tests and benchmarks).
        self.messages_read = 0
        self._probes: set[asyncio.Future[None]] = set()

    def _probed(self, queue: Callable[[], asyncio.Queue[DeliveredMessage | None]],
                ) -> Callable[[asyncio.Future[None]], None]:
        """When a probe's publish failed, its read would wait for it for ever: it is
        woken as by a lost channel (and starts over)."""
        def done(probing: asyncio.Future[None]) -> None:
            self._probes.discard(probing)
            if probing.cancelled() or probing.exception() is not None:
                queue().put_nowait(None)
        return done

    def start_for(self, task_ids: set[str], mode: str) -> Start:
        """Where a read of ``task_ids`` begins. ``mode`` ``latest`` (only the latest
        status or final matters): from their creation, passing over what the index has
        read, and from ``stream_margin`` earlier for a task nothing is found of. ``all``
        or ``final`` (every event): at their first events when the index knows them,
        else from their creation minus the margin."""
        index = self.index
        times = [uuid7_time(task_id) for task_id in task_ids]
        created = None if None in times else min(t for t in times if t is not None)
        begin = None if created is None else created - self.settings.stream_margin
        if mode == "latest":
            # From the creation itself: what ``get`` needs, the last status or the final,
            # comes after it unless the producer's clock is ahead of the broker's by more
            # than the task took; only a task nothing is found of is read again from
            # ``stream_margin`` earlier. On a dense stream the margin costs the most.
            # Either read passes over the ranges the index has read (``jump``).
            return Start(time=created, jump=True, fallback=begin)
        firsts = [index.first(task_id) for task_id in task_ids]
        if firsts and None not in firsts:
            return Start(offset=min(f for f in firsts if f is not None))
        if mode == "final" and created is not None:
            # From the creation too, if the first event found is the task's first (the
            # ``running`` of attempt 1); else again from the margin.
            return Start(time=created, fallback=begin, verify_first=True)
        return Start(time=begin)

    async def known_final(self, task_id: str) -> ResultEvent | None:
        """The task's success if the index has seen it: kept decoded, or read again at
        its offset (one message). Past the result TTL, the stream no longer holds it."""
        index = self.index
        if index.statuses.get(task_id, -1) > index.finals.get(task_id, -1):
            return None  # a status came after it (a workflow's claim): read what is newer
        event = index.events.get(task_id)
        if event is not None:
            if event.ts and event.ts + self.settings.ttl < time.time():
                index.forget(task_id)
                return None
            return event
        if task_id in index.finals:
            return await self._at(task_id, index.finals[task_id], "final")
        return None

    async def known_latest(self, task_id: str) -> ResultEvent | None:
        """The task's latest status or final the index has seen (the one at the highest
        offset: a status after a success, such as a workflow's claim, comes after it),
        read again at its offset (a success kept decoded is not read)."""
        index = self.index
        status, final = index.statuses.get(task_id, -1), index.finals.get(task_id, -1)
        if final > status:
            return await self.known_final(task_id)
        return None if status < 0 else await self._at(task_id, status, "latest")

    async def _at(self, task_id: str, offset: int, kind: str) -> ResultEvent | None:
        """The task's event of ``kind`` (``latest``: its last status or final) in the
        message at ``offset``; None (and the index forgets the task) when the stream no
        longer holds it there."""
        found: ResultEvent | None = None
        async for event in self.retrying({task_id}, Start(offset=offset),
                                         f"reading a result of task {task_id}", single=True):
            if event.kind == kind or (kind == "latest" and event.kind != "partial"):
                found = event
        if found is None:
            self.index.forget(task_id)
        return found

    async def retrying(self, task_ids: set[str], start: Start | float | None, what: str,
                       abandon: Callable[[], bool] | None = None,
                       until_finals: set[str] | None = None, single: bool = False,
                       success_only: bool = False) -> AsyncIterator[ResultEvent]:
        """``_replay``, started over (duplicates and all: readers de-duplicate) when it is
        interrupted, for up to ``publish_timeout``.

        Interrupted means the connection dropped, or the stream is not readable yet: right
        after a node restarts, a stream queue answers NOT_FOUND ("home node ... is down")
        for a moment after clients have reconnected. When ``abandon()`` says so after an
        interruption, the retries end with ``ReplayAbandoned``.
        """
        if not isinstance(start, Start):
            start = Start(time=start)
        deadline = time.monotonic() + self.settings.publish_timeout
        pause = 0.05
        while True:
            try:
                if start.fallback is None:
                    async for event in self._replay(task_ids, start, until_finals, single,
                                                    success_only):
                        yield event
                    return
                found = [event async for event in self._replay(
                    task_ids, start, until_finals, single, success_only)]
                opening: dict[str, ResultEvent] = {}
                for event in found:
                    opening.setdefault(event.id, event)
                redo = {t for t in task_ids if t not in opening or (
                    start.verify_first and not _opens(opening[t]))}
                for event in found:
                    if event.id not in redo:
                        yield event
                if not redo:
                    return
                task_ids = redo
                until_finals = until_finals and until_finals & redo
                start = Start(time=start.fallback, jump=start.jump)
                continue
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

    async def _replay(self, task_ids: set[str], start: Start, until_finals: set[str] | None,
                      single: bool, success_only: bool) -> AsyncIterator[ResultEvent]:
        """The events of ``task_ids`` in the stream from ``start`` to now: "now" is a
        probe message this reader appends after subscribing, and the read ends when it
        comes back, or once a final (``success_only``: a success) of each of
        ``until_finals`` is read, or (``single``) after the first message. Every message
        read is noted in the index."""
        connection = self.connection.live
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

        def receiver(queue: asyncio.Queue[DeliveredMessage | None],
                     ) -> Callable[[DeliveredMessage], Coroutine[Any, Any, None]]:
            async def receive(message: DeliveredMessage) -> None:
                queue.put_nowait(message)  # each consumer its queue: none leaks into the next
            return receive

        index = self.index
        first = last = -1
        awaited = set(until_finals) if until_finals else None
        # A read that jumps holds its events to the end: at each jump, those of a task the
        # range passed over has a newer status of are dropped (``latest`` reads only).
        held: list[ResultEvent] | None = [] if start.jump else None
        try:
            # aiormq directly (as for the inbox): a replay reads every result message of
            # its stretch, and aio-pika's wrapper would double the cost of each.
            underlay = await channel.get_underlay_channel()
            prefetch = 1 if single else JUMPING_PREFETCH if start.jump else STREAM_PREFETCH
            await underlay.basic_qos(prefetch_count=prefetch)
            consumer = await underlay.basic_consume(
                self.settings.stream_queue, receiver(received),
                arguments={"x-stream-offset": start.argument()})
            if not single:
                # Not awaited: the read begins meanwhile, and may end (at a final) first.
                probing = asyncio.ensure_future(self._probe(probe))
                self._probes.add(probing)
                probing.add_done_callback(self._probed(lambda: received))
            unacked = 0
            while True:
                message = await received.get()
                if message is None:
                    raise _Interrupted
                unacked += 1
                if unacked >= prefetch // 4 or single:  # streams send more once acked
                    await underlay.basic_ack(message.delivery_tag or 0, multiple=True)
                    unacked = 0
                self.messages_read += 1
                properties = message.header.properties
                offset = _offset(properties)
                if single and offset != start.offset:
                    return  # that offset is gone (expired): nothing there any more
                passed = index.range_at(offset) if start.jump else None
                if passed is not None:
                    # The index has read this range: go on after it.
                    lo, hi = passed
                    first = lo if first < 0 else first
                    last = max(last, hi - 1)
                    assert held is not None
                    held = [event for event in held
                            if max(index.statuses.get(event.id, -1),
                                   index.finals.get(event.id, -1)) < lo]
                    await underlay.basic_cancel(consumer.consumer_tag or "")
                    received = asyncio.Queue()
                    consumer = await underlay.basic_consume(
                        self.settings.stream_queue, receiver(received),
                        arguments={"x-stream-offset": hi})
                    continue
                if first < 0:
                    first = offset
                last = max(last, offset)
                ended = properties.message_id == probe
                for event in [] if ended else self._events(
                        message, task_ids, needles if verbatim else None, offset, start):
                    if event.kind == "final":
                        index.keep(event)
                        if awaited is not None and (event.status == "success"
                                                    or not success_only):
                            awaited.discard(event.id)
                    if held is None:
                        yield event
                    else:
                        held.append(event)
                if ended or single or awaited == set():
                    for event in held or ():
                        yield event
                    if not single:
                        index.covered(first, last)
                    return
        except _Interrupted:
            raise
        except Exception as exc:
            if self.connection.robust is None or channel.is_closed:
                raise _Interrupted from exc
            raise
        finally:
            await quietly(channel.close())

    def _events(self, message: DeliveredMessage, task_ids: set[str],
                needles: list[bytes] | None, offset: int, start: Start) -> list[ResultEvent]:
        """The events of ``task_ids`` in one message; every task's noted in the index."""
        properties = message.header.properties
        task_id = properties.correlation_id
        kind = properties.message_type or ""
        since = start.time if start.offset is None else None
        if task_id is not None:
            # A final's message id ends with its status (finals.envelope).
            status = (properties.message_id or "").rpartition(".")[2] if kind == "final" \
                else None
            self.index.note(task_id, kind, offset, since, status)
            if task_id not in task_ids:
                return []
            return [e for e in read_results(message.body, "RabbitMQ result stream")
                    if e.id in task_ids]
        if kind != "batch":  # a probe, or something not ours
            return []
        # Grouped finals of several tasks: their ids are in the body.
        if needles is not None and not any(n in message.body for n in needles):
            for task, status in _finals_in(message.body):
                self.index.note(task, "final", offset, since, status)
            return []
        events = read_results(message.body, "RabbitMQ result stream")
        for event in events:
            self.index.note(event.id, event.kind, offset, since, event.status)
        return [e for e in events if e.id in task_ids]


def _opens(event: ResultEvent) -> bool:
    """The first event a task ever has: the ``running`` status of its first attempt."""
    return event.kind == "status" and event.status == "running" and event.attempt == 1


def _offset(properties: Any) -> int:
    headers = properties.headers or {}
    try:
        return int(headers.get("x-stream-offset", -1))
    except (TypeError, ValueError):
        return -1


def _finals_in(body: bytes) -> list[tuple[str, str | None]]:
    """The task ids and statuses of a group of finals, without building their events (a
    body that is not one is the readers' to report, not the index's)."""
    try:
        events = orjson.loads(body).get("events") or []
        return [(event["id"], event.get("status")) for event in events
                if isinstance(event, dict) and isinstance(event.get("id"), str)]
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return []
