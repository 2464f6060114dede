"""The live side of the NATS result store: the submitter's one subscription to the
results of every task it submits, routed to a buffer per expected task, and listeners.

A task's events reach its submitter's subscription, which existed before the task was
published, so a ``watch`` right after ``add_task`` reads them from memory. What may have
lost events (a reconnect, a slow consumer, an overflow) breaks the buffer, and its reader
replays the stream instead (``replay``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from qtasks.brokers.nats.connection import Connection, Subscribed
from qtasks.brokers.nats.settings import token
from qtasks.protocol import ResultEvent, read_results
from qtasks.results.nats.names import Names

log = logging.getLogger(__name__)


class Inbox:
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
        self.sub: Subscribed | JetStreamContext.PushSubscription | None = None

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
            for event in read_results(msg.data, msg.subject):
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
class Expectation:
    """The events of one submitted task, routed here by the submitter's subscription,
    which existed before the task was published."""

    inbox: Inbox
    epoch: int
    created: float


class LiveInbox:
    """Where the events of the tasks this process submitted arrive, by task."""

    def __init__(self, conn: Connection, names: Names, expect_timeout: float,
                 max_expected: int) -> None:
        self.conn = conn
        self.names = names
        self.expect_timeout = expect_timeout
        self.max_expected = max_expected
        #: Keyed by the encoded task id, as the subject carries it.
        self._expected: OrderedDict[str, Expectation] = OrderedDict()
        #: Expectations taken by a ``watch`` (one each: a second watcher replays).
        self._watched: dict[str, Expectation] = {}
        #: This store's token in the subjects of the tasks it submits.
        self.reply = uuid.uuid4().hex
        self._reply_sub: Subscribed | None = None
        self._reply_lock = asyncio.Lock()

    async def close(self) -> None:
        self.lost()
        sub, self._reply_sub = self._reply_sub, None
        if sub is not None:
            await sub.unsubscribe()

    def lost(self) -> None:
        """Core subscriptions miss what was published while we were away: live readers
        replay from the stream instead (an expectation dropped is the same as a broken
        one to ``watch``; dropping them all makes a report per lost message cheap)."""
        self._expected.clear()
        for expectation in self._watched.values():
            expectation.inbox.break_()

    def on_slow_consumer(self, sub: Subscription) -> None:
        if self._reply_sub is not None and sub is self._reply_sub.sub:
            self.lost()  # events were dropped: the same as missing them

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
        self._expected[key] = Expectation(Inbox(), self.conn.epoch, now)

    async def _subscribe_replies(self) -> None:
        """One subscription for the results of every task this store submits, active on
        the server (a PING round trip) before the first of them is published."""
        if self._reply_sub is not None:
            return
        async with self._reply_lock:
            if self._reply_sub is None:
                self._reply_sub = await self.conn.subscribe(
                    self.names.replies(self.reply), self._on_reply,
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

    def take(self, task_id: str) -> Expectation | None:
        """The task's buffer for its one ``watch``, if it was expected (else the watch
        replays); give it back with ``release``."""
        key = token(task_id)
        expectation = self._expected.pop(key, None)
        if expectation is not None:
            self._watched[key] = expectation
        return expectation

    def release(self, task_id: str, expectation: Expectation) -> None:
        key = token(task_id)
        if self._watched.get(key) is expectation:  # not a later watcher's
            del self._watched[key]

    async def listen(self, task_name: str) -> AsyncIterator[ResultEvent]:
        inbox = Inbox(drop_oldest=True)
        inbox.sub = await self.conn.subscribe(self.names.by_name(task_name), inbox.put)
        return _listening(inbox)


async def _listening(inbox: Inbox) -> AsyncIterator[ResultEvent]:
    try:
        async for event in inbox.events():
            yield event
    finally:
        await inbox.close()
