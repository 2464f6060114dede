"""The NATS result publisher: every event of a task into the results stream, and a
task's newest status or final into the KV bucket.

Speed and durability: every event goes out as a core-NATS publish into the stream's
subject (the stream stores it; one connection keeps their order) without waiting for a
PubAck each; with replicas (a cluster) each waits for its PubAck (``_send``). A final
is first put in the KV bucket with its PubAck awaited, then
published like the others, and then a flush (one PING shared by every final of that
moment) proves the server has received all of the task's events; only then does
``publish`` return, and the worker acks the task. If the connection dropped since any of
them was sent, they are all published again, in order, each with its PubAck awaited
(readers de-duplicate by ``(attempt, seq)``, and a final ends their stream).

The final goes to the bucket first, then to the stream: whoever saw the final in the
stream (``wait``) finds it with ``get``. A worker that dies between the two leaves the
task unacked; its redelivery finds the final in the bucket and publishes it again (a
duplicate at worst), then acks. Until then, a late reader (``watch`` replaying the stream)
that finds no final in the stream takes the bucket's (``_replay``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field, replace

import nats.errors

from qtasks.brokers.nats.connection import Connection
from qtasks.errors import MessageTooLargeError
from qtasks.protocol import ErrorInfo, ResultEvent, encode, encode_batch
from qtasks.results.nats.names import Names

log = logging.getLogger(__name__)

#: Bytes of ``max_payload`` kept for headers (the server drops the connection of a client
#: that sends more than ``max_payload``).
HEADER_RESERVE = 512
#: Unconfirmed events of one task kept for a republish; past this a checkpoint flushes.
CHECKPOINT = 512
#: Most partials in one ``batch`` message.
BATCH_MAX_EVENTS = 1000


@dataclass
class _Gathered:
    """Partials of one task yielded in the same event-loop turn: one message for all."""

    subject: str
    task: str
    bodies: list[bytes] = field(default_factory=list)
    size: int = 0


@dataclass
class _Unconfirmed:
    """Events of one running task sent without a PubAck, kept until proven stored."""

    epoch: int
    sent: list[tuple[str, bytes]] = field(default_factory=list)


class ResultPublisher:
    """Publishes the events of the tasks this process runs; see the module docstring."""

    def __init__(self, conn: Connection, names: Names, replicated: bool = False) -> None:
        self.conn = conn
        self.names = names
        #: Streams with replicas: every event waits for its PubAck (see ``_send``).
        self.replicated = replicated
        self._unconfirmed: dict[str, _Unconfirmed] = {}
        #: Partials not yet handed to the client, in batches, by task id.
        self._gathered: dict[str, list[_Gathered]] = {}
        #: A task's partials that could not be sent: raised by its next status or final.
        self._gather_failed: dict[str, Exception] = {}
        self._gathering: asyncio.Task[None] | None = None

    async def close(self) -> None:
        """Wait for the partials being sent."""
        if self._gathering is not None:
            with contextlib.suppress(Exception):
                await self._gathering

    async def publish(self, event: ResultEvent, body: bytes, reply_to: str | None = None) -> None:
        body = self._fit(event, body)
        subject = self.names.subject(event.task, event.id, reply_to)
        if event.kind == "partial":
            self._gather(event, subject, body)
            return
        await self._send_gathered(event.id)  # the partials before this event go first
        if event.kind != "final":
            await self._send_event(event.id, subject, body)
            await self._send(self.names.key_subject(event.id), body)
            if event.status != "running":
                await self._confirm(self._unconfirmed.pop(event.id))  # this run is over
            return
        conn = self.conn
        await conn.retry(f"store the final of {event.id}", lambda: conn.publish(
            self.names.key_subject(event.id), body))
        await self._send_event(event.id, subject, body)
        await self._confirm(self._unconfirmed.pop(event.id))

    def _gather(self, event: ResultEvent, subject: str, body: bytes) -> None:
        """Partials go out at the end of the event-loop turn they were yielded in, all of
        a task's in one message (a ``batch`` when more than one): a generator yielding
        in a tight loop costs one message per turn, not per value, and one yielding now
        and then still sends each at once."""
        batches = self._gathered.setdefault(event.id, [])
        limit = self.conn.max_payload - HEADER_RESERVE
        if not batches or len(batches[-1].bodies) >= BATCH_MAX_EVENTS \
                or batches[-1].size + len(body) + 64 > limit:
            batches.append(_Gathered(subject, event.task))
        batches[-1].bodies.append(body)
        batches[-1].size += len(body) + 1
        if self._gathering is None or self._gathering.done():
            self._gathering = asyncio.ensure_future(self._send_all_gathered())

    async def _send_all_gathered(self) -> None:
        while self._gathered:
            if self.replicated:  # each task's in order, the tasks side by side
                gathered, self._gathered = self._gathered, {}
                await asyncio.gather(*(self._send_batches(task_id, batches)
                                       for task_id, batches in gathered.items()))
                continue
            task_id = next(iter(self._gathered))
            await self._send_batches(task_id, self._gathered.pop(task_id))

    async def _send_batches(self, task_id: str, batches: list[_Gathered]) -> None:
        """In order; a failure is kept for the task's next status or final, which must
        not go out after a gap (and the worker then does not ack)."""
        try:
            for gathered in batches:
                await self._send_message(task_id, gathered)
        except Exception as exc:
            self._gather_failed.setdefault(task_id, exc)

    async def _send_gathered(self, task_id: str) -> None:
        """Before another event of the task: what was gathered for it, and whatever a
        send already under way holds, is handed to the client first."""
        if self._gathering is not None and not self._gathering.done():
            await asyncio.shield(self._gathering)  # sends everything gathered so far
        await self._send_batches(task_id, self._gathered.pop(task_id, []))
        if (failed := self._gather_failed.pop(task_id, None)) is not None:
            raise failed

    async def _send_message(self, task_id: str, gathered: _Gathered) -> None:
        bodies = gathered.bodies
        body = bodies[0] if len(bodies) == 1 else encode_batch(task_id, gathered.task, bodies)
        await self._send_event(task_id, gathered.subject, body)

    async def _send_event(self, task_id: str, subject: str, body: bytes) -> None:
        """A core publish into the results stream, remembered until proven stored."""
        unconfirmed = self._unconfirmed.get(task_id)
        if unconfirmed is None:
            unconfirmed = self._unconfirmed[task_id] = _Unconfirmed(self.conn.epoch)
        unconfirmed.sent.append((subject, body))
        if unconfirmed.epoch != self.conn.epoch or not self.conn.nc.is_connected:
            # The connection dropped since earlier events were sent (or is down): they may
            # be lost, and a core publish now would overtake them (readers drop what comes
            # after a later seq). All go again, in order, with PubAcks.
            await self._confirm(unconfirmed)
        else:
            await self._send(subject, body)
            if len(unconfirmed.sent) >= CHECKPOINT:
                await self._confirm(unconfirmed)

    async def _send(self, subject: str, body: bytes) -> None:
        """Core publish; while the client cannot buffer it (a long outage), wait for a
        PubAck instead, which retries through the reconnect.

        With replicas, always a PubAck: a core publish reaches the server this process is
        connected to, and the flush that proves it (``_confirm``) says nothing of the
        stream's leader, on another server, which drops what comes while it is being
        elected again (measured: a server killed under load left partials missing from
        the stream, readers saw gaps). Awaited one by one per task, so none overtakes
        an earlier one that failed."""
        if self.replicated:
            conn = self.conn
            await conn.retry(f"publish on {subject}", lambda: conn.publish(subject, body))
            return
        try:
            await self.conn.nc.publish(subject, body)
        except (nats.errors.OutboundBufferLimitError, nats.errors.ConnectionReconnectingError):
            conn = self.conn
            await conn.retry(f"publish on {subject}", lambda: conn.publish(subject, body))

    async def _confirm(self, unconfirmed: _Unconfirmed) -> None:
        """Make sure every event sent without a PubAck is stored: a flush proves the
        server received them, unless the connection dropped since; then they are
        published again, each with its PubAck awaited."""
        conn = self.conn
        if unconfirmed.epoch == conn.epoch:
            with contextlib.suppress(Exception):
                await conn.barrier()
                if unconfirmed.epoch == conn.epoch:
                    unconfirmed.sent.clear()
                    return
        log.warning("connection to NATS dropped while results were in flight: "
                    "publishing %d events again", len(unconfirmed.sent))
        for subject, body in unconfirmed.sent:
            await conn.retry(f"publish on {subject}",
                             lambda s=subject, b=body: conn.publish(s, b))  # type: ignore[misc]
        unconfirmed.sent.clear()
        unconfirmed.epoch = conn.epoch

    def _fit(self, event: ResultEvent, body: bytes) -> bytes:
        """Keep an event within the server's ``max_payload``: a final or status too large
        becomes an error saying so (so the task still ends and is acked); a partial too
        large is refused, which fails the task with that error."""
        limit = self.conn.max_payload - HEADER_RESERVE
        if len(body) <= limit:
            return body
        problem = (f"{event.kind} result of task {event.task!r} id {event.id} is "
                   f"{len(body)} bytes, over the NATS server's max_payload of "
                   f"{self.conn.max_payload} bytes")
        if event.kind == "partial":
            raise MessageTooLargeError(problem)
        log.error("%s: stored as an error instead", problem)
        error = ErrorInfo("MessageTooLargeError", problem)
        if event.kind == "final":
            return encode(replace(event, status="error", returning=None, error=error))
        return encode(replace(event, error=error))
