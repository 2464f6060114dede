"""NATS JetStream result store (nats-py): results out through a stream and a KV bucket.

Layout (all names derive from ``prefix``, see ``docs/nats.md``):

- stream ``{prefix}_RESULTS`` captures ``{prefix}.results.>`` with ``max_age`` = ``ttl``;
  every event of a task is published on ``{prefix}.results.<reply>.<task>.<id>`` (each
  encoded with ``connection.token``; ``<reply>`` is the submitter's ``reply_address``,
  ``_`` if it gave none), so one task is one subject, one task name one wildcard, and a
  submitter receives the results of everything it submitted through one subscription;
- KV bucket ``{prefix}_status`` (stream ``KV_{prefix}_status``) keeps, under the encoded
  task id, the task's newest ``status`` or ``final`` event, for ``get``.

Speed and durability: every event goes out as a core-NATS publish into the stream's
subject (the stream stores it; one connection keeps their order) without waiting for a
PubAck each. A final is first put in the KV bucket with its PubAck awaited, then
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
import datetime
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, DiscardPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

from qtasks.brokers.nats.connection import Connection, number, parse_url, token
from qtasks.errors import MessageDecodeError, MessageTooLargeError
from qtasks.interfaces import ResultStore
from qtasks.protocol import (
    ErrorInfo,
    ResultEvent,
    decode_result,
    decode_results,
    encode,
    encode_batch,
    uuid7_time,
)

log = logging.getLogger("qtasks.nats.results")

#: Bytes of ``max_payload`` kept for headers (the server drops the connection of a client
#: that sends more than ``max_payload``).
HEADER_RESERVE = 512
#: Unconfirmed events of one task kept for a republish; past this a checkpoint flushes.
CHECKPOINT = 512
#: How far before a UUIDv7's time a replay starts reading, for clock skew between hosts.
CLOCK_SKEW = 300.0


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


class _Inbox:
    """Messages of one subscription, appended by its callback and read in order.

    A callback subscription costs one task per subscription; ``Subscription.next_msg``
    costs one per message. ``broken`` (a reconnect, a slow consumer, an overflow) means
    messages may be missing: the reader stops and reads from the stream instead.
    """

    def __init__(self, limit: int = 65_536, drop_oldest: bool = False) -> None:
        self.items: deque[Msg] = deque()
        #: The reader's wait for the next item (a future: cheaper than an Event per inbox).
        self.waiter: asyncio.Future[None] | None = None
        self.broken = False
        self.limit = limit
        self.drop_oldest = drop_oldest
        self.dropped = 0
        self.sub: Subscription | None = None

    async def put(self, msg: Msg) -> None:
        if self.broken:
            return  # its reader replays from the stream: nothing more to keep
        if len(self.items) >= self.limit:
            if not self.drop_oldest:
                self.break_()
                return
            self.items.popleft()
            self.dropped += 1
            if self.dropped == 1:
                log.warning("a listener fell %d events behind: dropping its oldest events "
                            "(a live subscription, like any core-NATS subscriber)", self.limit)
        self.items.append(msg)
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def break_(self) -> None:
        self.broken = True
        self.items.clear()
        self.wake()

    async def next_message(self) -> Msg | None:
        """The next message, waiting for one; None once broken."""
        while not self.items:
            if self.broken:
                return None
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.items.popleft()

    async def events(self) -> AsyncIterator[ResultEvent]:
        """Decoded events until broken (or forever)."""
        while (msg := await self.next_message()) is not None:
            for event in _decode(msg):
                yield event

    async def messages(self) -> AsyncIterator[Msg]:
        """The raw messages until broken (or forever), for a reader of their metadata."""
        while (msg := await self.next_message()) is not None:
            yield msg

    async def close(self) -> None:
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()


#: Messages the submitter's one results subscription may hold unread before nats-py
#: reports a slow consumer (then every live watcher replays from the stream instead).
REPLY_PENDING_MSGS = 1 << 20
REPLY_PENDING_BYTES = 1 << 30


@dataclass
class _Expectation:
    """The events of one submitted task, routed here by the submitter's subscription,
    which existed before the task was published."""

    inbox: _Inbox
    epoch: int
    created: float


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
        self.expect_timeout = number(self.options, "expect_timeout", 300.0)
        # No subscription per task any more: a buffer costs well under 1 KB.
        self.max_expected = int(number(self.options, "max_expected", 100_000))
        self.replicas = int(number(self.options, "replicas", 1))
        self.conn = Connection(url, servers, self.options, "results")
        self.conn.reconnect_listeners.append(self._on_reconnect)
        self.conn.slow_consumer_listeners.append(self._on_slow_consumer)
        self.stream = f"{self.prefix}_RESULTS"
        self.bucket = f"{self.prefix}_status"
        self._kv: KeyValue | None = None
        #: Keyed by the encoded task id, as the subject carries it.
        self._expected: OrderedDict[str, _Expectation] = OrderedDict()
        #: Expectations taken by a ``watch`` (one each: a second watcher replays).
        self._watched: dict[str, _Expectation] = {}
        self._reply = uuid.uuid4().hex
        self._reply_sub: Subscription | None = None
        self._reply_lock = asyncio.Lock()
        self._unconfirmed: dict[str, _Unconfirmed] = {}
        #: Partials not yet handed to the client, in batches, by task id.
        self._gathered: dict[str, list[_Gathered]] = {}
        #: A task's partials that could not be sent: raised by its next status or final.
        self._gather_failed: dict[str, Exception] = {}
        self._gathering: asyncio.Task[None] | None = None

    # -- names ---------------------------------------------------------------------

    def subject(self, task_name: str, task_id: str, reply_to: str | None = None) -> str:
        reply = token(reply_to) if reply_to else "_"
        return f"{self.prefix}.results.{reply}.{token(task_name)}.{token(task_id)}"

    def task_subjects(self, task_id: str) -> str:
        """Every event of one task, whoever submitted it."""
        return f"{self.prefix}.results.*.*.{token(task_id)}"

    @property
    def reply_address(self) -> str:
        """This store's token in the subjects of the tasks it submits."""
        return self._reply

    def key_subject(self, task_id: str) -> str:
        return f"$KV.{self.bucket}.{token(task_id)}"

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
        self._kv = await self.conn.retry("open KV bucket",
                                         lambda: self.conn.js.key_value(self.bucket))

    async def close(self) -> None:
        if not self.conn.started:
            return
        if self._gathering is not None:
            with contextlib.suppress(Exception):
                await self._gathering
        self._expected.clear()
        for expectation in self._watched.values():
            expectation.inbox.break_()
        sub, self._reply_sub = self._reply_sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await self.conn.close()

    def _on_reconnect(self) -> None:
        """Core subscriptions miss what was published while we were away: live readers
        replay from the stream instead (an expectation dropped is the same as a broken
        one to ``watch``; dropping them all makes a report per lost message cheap)."""
        self._expected.clear()
        for expectation in self._watched.values():
            expectation.inbox.break_()

    def _on_slow_consumer(self, sub: Subscription) -> None:
        if sub is self._reply_sub:
            self._on_reconnect()  # events were dropped: the same as missing them

    # -- publishing ----------------------------------------------------------------

    async def publish(self, event: ResultEvent, body: bytes, reply_to: str | None = None) -> None:
        body = self._fit(event, body)
        subject = self.subject(event.task, event.id, reply_to)
        if event.kind == "partial":
            self._gather(event, subject, body)
            return
        await self._send_gathered(event.id)  # the partials before this event go first
        if event.kind != "final":
            await self._send_event(event.id, subject, body)
            await self._send(self.key_subject(event.id), body)
            if event.status != "running":
                await self._confirm(self._unconfirmed.pop(event.id))  # this run is over
            return
        conn = self.conn
        await conn.retry(f"store the final of {event.id}", lambda: conn.publish(
            self.key_subject(event.id), body))
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
        PubAck instead, which retries through the reconnect."""
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

    # -- reading -------------------------------------------------------------------

    async def get(self, task_id: str) -> ResultEvent | None:
        """The bucket's entry (a final is in the bucket before it is in the stream)."""
        kv = self._kv
        if kv is None:
            raise RuntimeError("NatsResultStore used before start()")
        try:
            entry = await self.conn.retry(f"get {task_id}", lambda: kv.get(token(task_id)))
        except nats.js.errors.KeyNotFoundError:
            return None
        return decode_result(entry.value) if entry.value else None

    async def expect(self, task_id: str) -> None:
        """Route the task's events, which carry this store's ``reply_address``, to a
        buffer that ``watch`` reads, instead of replaying the stream. Bounded: an
        expectation not watched within ``expect_timeout`` seconds, or beyond the
        ``max_expected`` newest, is dropped (``watch`` then replays)."""
        key = token(task_id)
        if key in self._expected:
            return
        try:
            await self._subscribe_replies()
        except Exception as exc:  # only a hint: watch() replays from the stream instead
            log.debug("expect(%s) failed: %s", task_id, exc)
            return
        now = time.monotonic()
        while self._expected:
            oldest = next(iter(self._expected.values()))
            if len(self._expected) < self.max_expected and \
                    now - oldest.created < self.expect_timeout:
                break
            self._expected.popitem(last=False)
        self._expected[key] = _Expectation(_Inbox(), self.conn.epoch, now)

    async def _subscribe_replies(self) -> None:
        """One subscription for the results of every task this store submits, active on
        the server (a PING round trip) before the first of them is published."""
        if self._reply_sub is not None:
            return
        async with self._reply_lock:
            if self._reply_sub is None:
                self._reply_sub = await self.conn.subscribe(
                    f"{self.prefix}.results.{self._reply}.>", self._on_reply,
                    pending_msgs_limit=REPLY_PENDING_MSGS,
                    pending_bytes_limit=REPLY_PENDING_BYTES)

    async def _on_reply(self, msg: Msg) -> None:
        key = msg.subject.rpartition(".")[2]
        for expectation in (self._expected.get(key), self._watched.get(key)):
            if expectation is None:
                continue
            if expectation.epoch != self.conn.epoch:
                # The connection dropped since it was made: nats-py resubscribes before it
                # reports the reconnect, so this may follow a gap. Its reader replays.
                expectation.inbox.break_()
            else:
                await expectation.inbox.put(msg)

    async def watch(self, task_id: str) -> AsyncIterator[ResultEvent]:
        key = token(task_id)
        expectation = self._expected.pop(key, None)
        if expectation is not None:
            self._watched[key] = expectation
            try:
                if expectation.epoch == self.conn.epoch:
                    async for event in expectation.inbox.events():
                        yield event
                        if event.is_final:
                            return
            finally:
                if self._watched.get(key) is expectation:  # not a later watcher's
                    del self._watched[key]
            log.debug("live results of %s interrupted; replaying them from the stream", task_id)
        async for event in self._replay(task_id):
            yield event
            if event.is_final:
                return

    async def _replay(self, task_id: str) -> AsyncIterator[ResultEvent]:
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
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        if created is not None:
            config.deliver_policy = DeliverPolicy.BY_START_TIME
            config.opt_start_time = datetime.datetime.fromtimestamp(
                max(0.0, created - CLOCK_SKEW), tz=datetime.UTC)
        js = self.conn.js
        inbox = _Inbox(limit=1 << 62)  # flow control bounds what the server sends
        inbox.sub = await self.conn.retry(f"replay {task_id}", lambda: js.subscribe(
            self.task_subjects(task_id), stream=self.stream, cb=inbox.put,
            ordered_consumer=True, idle_heartbeat=2.0, config=config))
        try:
            # Read after subscribing: a final the bucket lacks now reaches the stream
            # later (the bucket is written first), where this consumer will see it.
            stored = await self._stored_final(task_id)
            # Messages already in: the stream has some, and ``_caught_up`` decides.
            if stored is not None and not inbox.items and await _nothing_stored(inbox.sub):
                yield stored
                return
            newest_attempt = 0
            async for msg in inbox.messages():
                for event in _decode(msg):
                    newest_attempt = max(newest_attempt, event.attempt)
                    yield event  # a final ends the watch: the bucket's is not needed
                if stored is not None and _caught_up(msg):
                    if stored.attempt >= newest_attempt:
                        yield stored
                        return
                    stored = None  # a newer attempt runs: its own final will come
        finally:
            await inbox.close()

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

    async def listen(self, task_name: str) -> AsyncIterator[ResultEvent]:
        name = "*" if task_name == "*" else token(task_name)
        inbox = _Inbox(drop_oldest=True)
        inbox.sub = await self.conn.subscribe(f"{self.prefix}.results.*.{name}.*", inbox.put)
        return _listening(inbox)


def _decode(msg: Msg) -> list[ResultEvent]:
    try:
        return decode_results(msg.data)
    except MessageDecodeError as exc:
        log.warning("skipping an undecodable result on %s: %s", msg.subject, exc)
        return []


def _caught_up(msg: Msg) -> bool:
    """Whether ``msg`` was the last stored message of its consumer when delivered."""
    try:
        return msg.metadata.num_pending == 0
    except Exception:  # not a JetStream delivery: no metadata to tell
        return False


async def _nothing_stored(sub: Subscription | None) -> bool:
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


async def _listening(inbox: _Inbox) -> AsyncIterator[ResultEvent]:
    try:
        async for event in inbox.events():
            yield event
    finally:
        await inbox.close()
