"""Dead letters on a stream of their own, and the operator's view of the queues.

Stream ``{prefix}_DEAD`` captures ``{prefix}.dead.>`` and ``{prefix}.dead-notes.>``. A
dead letter of queue ``q`` is the message's body, byte for byte, on
``{prefix}.dead.<q>``, with the reason and where it came from in headers
(``QTasks-Dead-Reason`` ...).

A body close to the server's ``max_payload`` may leave no room for those headers (the
server closes the connection of a client that sends more than ``max_payload``, headers
included). Such a letter is stored bare, without headers, and the headers it would have
had go first to a note: an empty message on ``{prefix}.dead-notes.<ref>``, ``ref`` being
the letter's ``dead_letter_ref``. The body is never cut; the reason never lost.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Sequence

from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError

from qtasks.brokers.nats.connection import Connection
from qtasks.brokers.nats.settings import token
from qtasks.brokers.nats.topology import MSG_ID, Topology, headers_size, read_float
from qtasks.interfaces import DeadLetter, QueueStats, dead_letter_ref

#: Header names, part of the documented wire format.
DEAD_REASON = "QTasks-Dead-Reason"
DEAD_SUBJECT = "QTasks-Original-Subject"
DEAD_QUEUE = "QTasks-Queue"
DEAD_DELIVERED = "QTasks-Delivered"
DEAD_AT = "QTasks-Dead-At"

_MAX_REASON = 1024
_ESCAPED = re.compile(r"=([0-9A-F]{2})")


def _untoken(encoded: str) -> str:
    """The name that ``settings.token`` encoded as ``encoded``."""
    if "=" not in encoded:
        return encoded
    raw = _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), encoded)  # a char per byte
    return "" if encoded == "=" else raw.encode("latin-1").decode("utf-8", "replace")


class DeadLetters:
    """The dead-letter stream of one prefix: filing, listing, counting, requeueing."""

    def __init__(self, conn: Connection, topology: Topology, ttl: float) -> None:
        self.conn = conn
        self.topology = topology
        self.ttl = ttl
        prefix = topology.prefix
        self.stream = f"{prefix}_DEAD"
        self.letters = f"{prefix}.dead.>"
        self._notes = f"{prefix}.dead-notes."

    def subject(self, queue: str) -> str:
        return f"{self.topology.prefix}.dead.{token(queue)}"

    async def declare(self) -> None:
        await self.conn.ensure_stream(StreamConfig(
            name=self.stream, subjects=[self.letters, self._notes + ">"],
            storage=StorageType.FILE, num_replicas=self.topology.replicas,
            max_age=self.ttl or None,
            description="QTasks dead letters: original body, reason in headers"))

    async def publish(self, msg: Msg, queue: str, reason: str) -> None:
        """File ``msg`` byte for byte with ``reason``; bare, with a note, if its headers
        would take it over ``max_payload``."""
        meta = msg.metadata
        where = f"{meta.stream}:{meta.sequence.stream}"
        headers = {
            MSG_ID: f"dead:{where}", DEAD_SUBJECT: msg.subject, DEAD_QUEUE: queue,
            DEAD_DELIVERED: str(meta.num_delivered), DEAD_AT: repr(time.time()),
            DEAD_REASON: " ".join(reason.split())[:_MAX_REASON],
        }
        conn, body, subject = self.conn, msg.data, self.subject(queue)
        if len(body) + headers_size(headers, self.stream) <= conn.max_payload:
            await conn.retry(f"dead-letter {where}", lambda: conn.publish(
                subject, body, headers=headers, stream=self.stream))
            return
        note = {**headers, MSG_ID: f"dead-note:{where}"}
        await conn.retry(f"note of dead letter {where}", lambda: conn.publish(
            self._notes + dead_letter_ref(body), b"", headers=note, stream=self.stream))
        await conn.retry(f"dead-letter {where}", lambda: conn.publish(subject, body))

    async def _read(self, limit: int) -> list[tuple[int, int | None, DeadLetter]]:
        """The oldest letters: each one's sequence, its note's (if it is bare), itself."""
        js, seq = self.conn.js, 1
        found: list[tuple[int, int | None, DeadLetter]] = []
        while len(found) < limit:
            try:
                msg = await js.get_msg(self.stream, seq=seq, next=True, subject=self.letters)
            except NotFoundError:
                break
            seq = int(msg.seq or seq)
            body, headers, note_seq = msg.data or b"", msg.headers or {}, None
            ref = dead_letter_ref(body)
            if DEAD_REASON not in headers:
                with contextlib.suppress(NotFoundError):
                    note = await js.get_last_msg(self.stream, self._notes + ref)
                    headers, note_seq = note.headers or {}, note.seq
            queue = headers.get(DEAD_QUEUE) or _untoken((msg.subject or "").rpartition(".")[2])
            found.append((seq, note_seq, DeadLetter(
                ref=ref, queue=queue, body=body, reason=headers.get(DEAD_REASON, ""),
                at=read_float(headers.get(DEAD_AT)))))
            seq += 1
        return found

    async def oldest(self, limit: int) -> list[DeadLetter]:
        return [letter for _, _, letter in await self._read(limit)]

    async def count(self) -> int:
        """From the stream's own count of the letters' subjects (one per queue)."""
        info = await self.conn.js.stream_info(self.stream, subjects_filter=self.letters)
        return sum((info.state.subjects or {}).values())

    async def requeue(self, refs: Sequence[str] | None) -> list[str]:
        """Publish each chosen dead letter back to its queue (acknowledged), then delete
        it from the stream: a crash in between duplicates, never loses."""
        wanted = None if refs is None else set(refs)
        requeued: list[str] = []
        for seq, note_seq, letter in await self._read(limit=1_000_000):
            if wanted is not None and letter.ref not in wanted:
                continue
            await self.topology.publish_body(letter.queue, letter.body,
                                             f"requeued:{self.stream}:{seq}")
            await self.conn.js.delete_msg(self.stream, seq)
            if note_seq is not None:  # a newer note (dead again since) stays
                with contextlib.suppress(NotFoundError):  # shared by identical bodies
                    await self.conn.js.delete_msg(self.stream, note_seq)
            if letter.ref not in requeued:
                requeued.append(letter.ref)
        return requeued

    async def purge(self) -> int:
        count = await self.count()
        await self.conn.js.purge_stream(self.stream)
        return count


async def queue_stats(topology: Topology, queues: Sequence[str]) -> list[QueueStats]:
    """Ready and in-flight counts from each queue's shared consumer. JetStream does not
    know how many workers share a pull consumer, so ``consumers`` stays unknown."""
    stats = []
    for queue in queues:
        info = await topology.conn.js.consumer_info(topology.stream, topology.consumer(queue))
        stats.append(QueueStats(queue, int(info.num_pending or 0),
                                int(info.num_ack_pending or 0)))
    return stats
