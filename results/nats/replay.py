"""The replay reader of the NATS result store: a task's stored events from the results
stream, then live ones, for a reader that did not (or no longer) receive them live; and
the KV bucket's newest status or final of a task (``get``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import AsyncIterator

import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from qtasks.brokers.nats.connection import Connection, NotStartedError
from qtasks.brokers.nats.settings import token
from qtasks.protocol import ResultEvent, decode_result, read_results, uuid7_time
from qtasks.results.nats.inbox import Inbox
from qtasks.results.nats.names import Names

log = logging.getLogger(__name__)

#: How far before a UUIDv7's time a replay starts reading, for clock skew between hosts.
CLOCK_SKEW = 300.0
#: Seconds without a message after which a replay checks that its consumer still exists
#: and whether the bucket holds the task's final (a server of a cluster died).
IDLE_CHECK = 3.0


class ReplayReader:
    """Reads what the results stream and the bucket hold."""

    def __init__(self, conn: Connection, names: Names) -> None:
        self.conn = conn
        self.names = names
        self.kv: KeyValue | None = None

    async def get(self, task_id: str) -> ResultEvent | None:
        """The bucket's entry (a final is in the bucket before it is in the stream)."""
        kv = self.kv
        if kv is None:
            raise NotStartedError("NatsResultStore used before start()")
        try:
            entry = await self.conn.retry(f"get {task_id}", lambda: kv.get(token(task_id)))
        except nats.js.errors.KeyNotFoundError:
            return None
        return decode_result(entry.value) if entry.value else None

    async def read(self, task_id: str) -> AsyncIterator[ResultEvent]:
        """Every stored event of the task, then live ones: an ordered consumer (nats-py
        recreates it after a gap or a missed heartbeat) filtered on the task's subject.

        The bucket is the fallback for a final the stream lacks. A worker puts the final
        in the bucket (PubAck awaited), then core-publishes it on the stream; if it dies
        or loses its connection in between, only the bucket has it until the task's
        redelivery publishes it again, which may be long (``ack_wait``) or never (no
        worker left). So when the bucket already holds the task's final as the replay
        starts, that final ends the replay once every stored event has been read
        (``num_pending`` 0) without a final among them. It is dropped, as a reader drops
        any older event, if the stream showed a newer attempt."""
        created = uuid7_time(task_id)
        newest_attempt = 0
        seen: dict[int, set[int]] = {}  # partial seqs read, by attempt
        after: int | None = None  # the stream sequence of the last message read
        missing = False  # subscribed again once for partials the bucket's final counts
        while True:
            inbox = await self._subscribe(task_id, _start(created, after))
            try:
                # Read after subscribing: a final the bucket lacks now reaches the stream
                # later (the bucket is written first), where this consumer will see it.
                stored = await self._stored_final(task_id)
                # Messages already in: the stream has some, and ``_caught_up`` decides.
                if after is None and stored is not None and not stored.partials and \
                        not inbox.items and await _nothing_stored(inbox.sub):
                    yield stored
                    return
                while True:
                    try:
                        msg = await asyncio.wait_for(inbox.next_message(), IDLE_CHECK)
                    except TimeoutError:
                        stored = stored or await self._stored_final(task_id)
                        verdict = await self._idle(task_id, inbox, stored, newest_attempt, seen)
                        if verdict == "final" or (verdict == "missing" and missing):
                            # The stream lacks it (yet), or the partials it counts even
                            # when read again: the bucket's final ends the read.
                            assert stored is not None
                            yield stored
                            return
                        if verdict in ("again", "missing"):
                            missing = missing or verdict == "missing"
                            break  # subscribed again, from after what was read
                        continue
                    if msg is None:
                        return
                    for event in read_results(msg.data, msg.subject):
                        newest_attempt = max(newest_attempt, event.attempt)
                        if event.kind == "partial":
                            seen.setdefault(event.attempt, set()).add(event.seq)
                        yield event  # a final ends the watch: the bucket's is not needed
                    with contextlib.suppress(Exception):
                        after = msg.metadata.sequence.stream
                    if stored is not None and _caught_up(msg) and \
                            len(seen.get(stored.attempt, ())) >= (stored.partials or 0):
                        if stored.attempt >= newest_attempt:
                            yield stored
                            return
                        stored = None  # a newer attempt runs: its own final will come
            finally:
                await inbox.close()

    async def _idle(self, task_id: str, inbox: Inbox, stored: ResultEvent | None,
                    newest_attempt: int, seen: dict[int, set[int]]) -> str:
        """What ``IDLE_CHECK`` seconds without a message mean. ``again``: the consumer
        is gone or holds back what is pending (it lived on a server that died; nats-py
        cannot make an ordered consumer by start time again, 10094), so the read goes on
        with a new one; ``final``: the stream has nothing more and the bucket's final
        ends the read, its partials all read; ``missing``: the same, some of the partials
        it counts not read (read again once, then the final ends it); ``wait``: the task
        runs on."""
        sub = inbox.sub
        if not isinstance(sub, JetStreamContext.PushSubscription):
            return "wait"
        try:
            info = await sub.consumer_info()
        except Exception as exc:
            log.info("replay of %s: its consumer is gone (%s: %s); subscribing again",
                     task_id, type(exc).__name__, exc)
            return "again"
        if info.num_pending:
            return "again"
        if stored is None or stored.attempt < newest_attempt:
            return "wait"
        if len(seen.get(stored.attempt, ())) >= (stored.partials or 0):
            return "final"
        return "missing"  # partials the consumer did not hand over (or the stream lacks)

    async def _subscribe(self, task_id: str, config: ConsumerConfig) -> Inbox:
        js = self.conn.js
        inbox = Inbox(limit=1 << 62)  # flow control bounds what the server sends
        inbox.sub = await self.conn.retry(f"replay {task_id}", lambda: js.subscribe(
            self.names.task_subjects(task_id), stream=self.names.stream, cb=inbox.put,
            ordered_consumer=True, idle_heartbeat=2.0, config=config))
        return inbox

    async def _stored_final(self, task_id: str) -> ResultEvent | None:
        """The task's final if the bucket holds one (best effort: on a failure the
        replay just follows the stream, as it did before there was a fallback)."""
        try:
            event = await self.get(task_id)
        except Exception as exc:
            log.debug("replay of %s: cannot read the bucket (%s: %s)", task_id,
                      type(exc).__name__, exc)
            return None
        return event if event is not None and event.is_final else None


def _start(created: float | None, after: int | None) -> ConsumerConfig:
    """A new consumer's config: from the stream sequence after ``after`` when a message
    was read, else from the id's time (less ``CLOCK_SKEW``), else from the start."""
    if after is not None:
        return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                              opt_start_seq=after + 1)
    if created is None:
        return ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME,
                          opt_start_time=datetime.datetime.fromtimestamp(
                              max(0.0, created - CLOCK_SKEW), tz=datetime.UTC))


def _caught_up(msg: Msg) -> bool:
    """Whether ``msg`` was the last stored message of its consumer when delivered."""
    try:
        return msg.metadata.num_pending == 0
    except Exception:  # not a JetStream delivery: no metadata to tell
        return False


async def _nothing_stored(sub: object) -> bool:
    """Whether the replay's consumer had nothing to deliver: nothing delivered and nothing
    pending. (Something stored is seen by ``_caught_up`` on its last message instead.)"""
    if not isinstance(sub, JetStreamContext.PushSubscription):
        return False
    try:
        info = await sub.consumer_info()
    except Exception as exc:
        log.debug("replay: consumer info failed (%s: %s)", type(exc).__name__, exc)
        return False
    delivered = info.delivered.consumer_seq if info.delivered is not None else 0
    return bool(info.num_pending == 0 and not delivered)
