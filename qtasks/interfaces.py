"""The two contracts a backend fulfils: ``Broker`` (tasks in) and ``ResultStore`` (results out).

The core talks to brokers only through these classes and never imports a broker library.
A backend is correct when it passes the shared contract suite (``tests/contract.py``); the
docstrings below are the prose form of that suite.

Delivery guarantee: at-least-once. A task message is settled (``ack``) only after its final
result is durable in the result store, so a worker that dies mid-task loses nothing: the
broker hands the message to another worker. Consumers de-duplicate results by
``(attempt, seq)``, see ``docs/protocol.md``.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from qtasks.errors import NotSupportedError
from qtasks.protocol import ResultEvent, TaskMessage


async def close_iterator(iterator: AsyncIterator[Any]) -> None:
    """Close an async iterator if it can be closed (an async generator can; a plain
    ``AsyncIterator`` may not), so that its ``finally`` runs now: a consumer gives back
    what it held, a subscription ends, a generator task stops."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


@dataclass(slots=True)
class QueueStats:
    """One task queue as an operator sees it (``qtasks inspect``)."""

    queue: str
    ready: int
    in_flight: int | None = None
    consumers: int | None = None


@dataclass(slots=True)
class DeadLetter:
    """A message that was taken out of circulation, with why (``qtasks dead list``)."""

    #: Its handle for ``requeue_dead``: ``dead_letter_ref(body)`` on every backend, so an
    #: operator's refs look alike whatever the broker.
    ref: str
    queue: str
    body: bytes
    reason: str
    at: float | None = None


def dead_letter_ref(body: bytes) -> str:
    """A dead letter's ref: the first 16 hex digits of the SHA-1 of its body. Computed
    from the bytes alone, so any backend can give it to any message (one that could not
    even be decoded), and the same on every broker; two byte-identical dead letters share
    it, and are requeued together."""
    return hashlib.sha1(body, usedforsecurity=False).hexdigest()[:16]


class Delivery(abc.ABC):
    """One task message leased to one worker until it is settled.

    Exactly one of ``ack``, ``retry_later``, ``requeue`` or ``dead_letter`` settles it; after
    that the others are no-ops. Settling a delivery whose connection has died since it was
    received must not raise and must not retry forever: the broker redelivers such a
    message by itself, so the backend logs the lost settlement and returns.
    """

    #: The raw message body as published. The worker decodes it, not the broker, so that a
    #: body the core cannot read is still dead-lettered intact.
    body: bytes
    #: True when the broker says this message was handed out before (a worker died or
    #: gave it back). The worker then checks the result store before running it again.
    redelivered: bool = False

    @abc.abstractmethod
    async def ack(self) -> None:
        """The task is done and its result is durable: remove the message for good."""

    @abc.abstractmethod
    async def retry_later(self, delay: float) -> None:
        """Hand the same message out again, to any worker, no sooner than ``delay`` seconds
        from now. Used when a message arrives before its ``not_before``."""

    @abc.abstractmethod
    async def requeue(self) -> None:
        """Give the message back at once, unprocessed (the worker is shutting down)."""

    @abc.abstractmethod
    async def dead_letter(self, reason: str) -> None:
        """Move the message, byte for byte, to the dead-letter destination with ``reason``
        attached, then remove it from the work queue. Never drops the message."""

    @property
    def lost(self) -> bool:
        """True once this delivery can no longer be settled: its channel or connection is
        gone and the broker has put the message back (RabbitMQ). A worker lets such a
        delivery go when a newer delivery of the same message joins its run."""
        return False

    async def let_go(self) -> None:
        """Give up a ``lost`` delivery: free what it holds here (its prefetch slot), send
        nothing. By default a settlement, which the contract makes a logged no-op then."""
        await self.requeue()

    async def keep_alive(self) -> None:  # noqa: B027 - deliberately optional
        """Extend the lease while a long task runs, so the broker does not hand the message
        to another worker. Called every ``Broker.lease_interval`` seconds; a no-op where
        the lease lasts as long as the connection (RabbitMQ)."""

#: Why a message was dead-lettered, as a short class (never free text, so that it can
#: label a metric): ``undecodable`` (no valid task message), ``unknown_task``,
#: ``unsigned`` and ``forged`` (a signing key is set), ``delivery_limit`` (delivered too
#: often without being settled: its workers died or stalled).
DeadLetterReason = Literal["undecodable", "unknown_task", "unsigned", "forged",
                           "delivery_limit"]


class Leadership(abc.ABC):
    """One process's turn as the active scheduler of a group (``Broker.lead``): while it
    lasts, this process alone enqueues the group's periodic ticks, each together with the
    record that it was enqueued (``qtasks.beat``, ``docs/periodic.md``)."""

    #: What the leaders before recorded with ``commit``: the last tick enqueued (Unix
    #: seconds) by schedule name, as read when this turn began.
    state: dict[str, float]
    #: Set when the turn ended without ``resign``: the connection was lost, or the lock
    #: passed to another process. A ``commit`` after that raises ``LeadershipLost``.
    lost: asyncio.Event

    @abc.abstractmethod
    async def commit(self, messages: Sequence[tuple[TaskMessage, bytes]],
                     state: Mapping[str, float]) -> None:
        """Publish ``messages`` (task messages with their encoded bodies) and record
        ``state``, as one step as far as the broker allows: a leader that dies half-way
        leaves either nothing or, where it cannot, copies that the broker drops (JetStream
        de-duplication by the messages' ids). Raises ``LeadershipLost`` when the turn has
        ended; nothing is then recorded."""

    @abc.abstractmethod
    async def resign(self) -> None:
        """End the turn now, so that another process leads at once; idempotent."""


class Broker(abc.ABC):
    """Carries task messages from producers to competing workers.

    ``publish`` returns only once the broker has taken responsibility for the message
    (publisher confirm, JetStream PubAck): a task whose ``add_task`` returned survives a
    broker restart. ``consume`` yields at most ``prefetch`` unsettled deliveries at once;
    higher ``priority`` first where ``supports_priority`` is true.
    """

    #: Whether ``TaskMessage.priority`` orders delivery. A broker that cannot order by
    #: priority sets this False; the app then refuses a non-zero priority at configuration
    #: time instead of ignoring it.
    supports_priority: bool = True
    #: Called as ``(queue, reason, detail)`` when the broker's consumer dead-letters a
    #: message on its own (``delivery_limit``), so that the worker's middleware hears of
    #: it as of the dead letters the worker makes itself. None: nobody listens.
    on_dead_letter: Callable[[str, DeadLetterReason, str], None] | None = None
    #: The highest priority it can order by (RabbitMQ's ``x-max-priority``), or None for
    #: no bound. The app refuses a priority outside ``0..max_priority`` rather than have
    #: it clamped silently.
    max_priority: int | None = None
    #: Whether a task message published again with the same id and attempt (a producer
    #: retrying a publish whose confirm it lost) is dropped within the broker's duplicate
    #: window (NATS JetStream, by ``Nats-Msg-Id``). Elsewhere the copy is delivered: the
    #: worker handling that task at the time joins it to the run (``qtasks.lease``);
    #: otherwise it runs again (at-least-once).
    deduplicates: bool = False
    #: Seconds between ``Delivery.keep_alive`` calls for a running task, or None.
    lease_interval: float | None = None
    #: The broker's own limit on one message, in bytes, once started (None: no limit).
    max_message_size: int | None = None
    #: True for an in-process broker: the app then runs an embedded worker by itself.
    embedded: ClassVar[bool] = False
    #: The URL it was made from (shown redacted in logs and the worker's start-up line).
    url: str = ""

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect (retrying with backoff) and declare what the backend needs."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect. Unsettled deliveries go back to their queue, as the broker does for a
        dead consumer."""

    @abc.abstractmethod
    async def publish(self, message: TaskMessage, body: bytes) -> None:
        """Durably enqueue ``body`` (the encoded ``message``) on ``message.queue``.

        Honour ``message.priority`` and, where the broker can, ``message.not_before``
        (delivering it no sooner). A broker that cannot delay may deliver early: the
        worker then calls ``retry_later`` with the time left.
        """

    @abc.abstractmethod
    def consume(self, queues: Sequence[str], prefetch: int) -> AsyncIterator[Delivery]:
        """Yield deliveries from ``queues`` as competing consumer, never more than
        ``prefetch`` unsettled at once. Survives reconnects. Closing the iterator stops
        consumption; messages received but not yielded go back to the queue."""

    async def declare(self, queues: Sequence[str]) -> None:  # noqa: B027 - optional
        """Create ``queues`` (and what they need) ahead of the first publish/consume."""

    # -- control: optional, for cancelling tasks ----------------------------------------

    async def broadcast(self, body: bytes) -> None:
        """Send ``body`` (an encoded ``ControlMessage``) to every worker subscribed to
        ``control`` now. Not stored: a worker that subscribes later, or is disconnected
        at that moment, does not get it. Returns once the broker has it."""
        raise NotSupportedError(f"{type(self).__name__} cannot broadcast to workers")

    async def control(self) -> AsyncIterator[bytes]:
        """Subscribe to ``broadcast``; returns once the subscription is active, so that
        nothing broadcast afterwards is missed while connected. The iterator follows
        reconnects and unsubscribes when closed."""
        raise NotSupportedError(f"{type(self).__name__} cannot broadcast to workers")

    # -- operations: optional, for the operator CLI ------------------------------------

    async def inspect(self, queues: Sequence[str]) -> list[QueueStats]:
        """Depth, in-flight count and consumers of each queue, as far as the broker tells."""
        raise NotSupportedError(f"{type(self).__name__} cannot inspect queues")

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters, left in place."""
        raise NotSupportedError(f"{type(self).__name__} cannot list dead letters")

    async def dead_count(self) -> int:
        """How many dead letters there are, from the broker's own count (not by reading
        them)."""
        raise NotSupportedError(f"{type(self).__name__} cannot count dead letters")

    async def requeue_dead(self, refs: Sequence[str] | None = None) -> list[str]:
        """Put dead letters (all, or those whose ref is in ``refs``) back on their queue;
        the refs of those requeued, so that a caller can name a ref that was not found."""
        raise NotSupportedError(f"{type(self).__name__} cannot requeue dead letters")

    async def purge_dead(self) -> int:
        """Delete every dead letter; how many were deleted."""
        raise NotSupportedError(f"{type(self).__name__} cannot purge dead letters")

    # -- periodic tasks: optional, for ``qtasks beat`` ----------------------------------

    async def lead(self, group: str, ttl: float) -> Leadership:
        """Wait until this process is the one leader of ``group`` among all that call
        this on the same broker, then return its turn. A leader that dies is followed by
        another within ``ttl`` seconds (sooner where the broker sees a closed connection
        at once); the broker's own means decide, never a clock compared across hosts."""
        raise NotSupportedError(f"{type(self).__name__} cannot elect a periodic scheduler")


class ResultStore(abc.ABC):
    """Carries status, partial and final results from workers to whoever wants them.

    Every event of a task is readable by id from any process for the result TTL
    (``watch``, ``get``) and is pushed to live subscribers (``listen``). Events of one task
    are delivered in the order they were published.
    """

    #: Seconds a task's results stay readable after they were published.
    ttl: float = 24 * 3600.0
    #: The URL it was made from (shown redacted in logs and the worker's start-up line).
    url: str = ""

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect (retrying with backoff) and declare what the backend needs."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush pending publishes, then disconnect."""

    @property
    def reply_address(self) -> str | None:
        """Where this process wants results of the tasks it submits, sent in the task's
        ``reply_to`` header; None if the store needs no such address."""
        return None

    async def expect(self, task_id: str) -> None:  # noqa: B027 - optional
        """A hint, given before the task is published, that this process will ``watch``
        ``task_id``: a backend may start buffering its events so that ``watch`` needs no
        replay from storage."""

    @abc.abstractmethod
    async def publish(self, event: ResultEvent, body: bytes, reply_to: str | None = None) -> None:
        """Publish one event (``body`` is its encoding).

        A ``partial`` or ``status`` may return before it is durable (publishes are
        pipelined), but events of one task are never reordered. A ``final`` returns only
        when it and every earlier event of the same task are durable: the task message is
        acked after that. ``reply_to`` is the submitter's ``reply_address``, if it gave one.
        """

    @abc.abstractmethod
    async def get(self, task_id: str) -> ResultEvent | None:
        """The newest ``status`` or ``final`` event of a task, or None if there is none
        (unknown id, not started yet, or expired)."""

    async def history(self, task_id: str) -> list[ResultEvent] | None:
        """Every event of a task stored up to now, in the log's order, as one finite read;
        None from a store that reads no faster so than with ``watch`` (which a caller
        then uses). A workflow's claim reads it (``qtasks.canvas.claims``)."""
        return None

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, ResultEvent]:
        """``get`` of several tasks (those with no event are left out): what a workflow's
        join reads of its members. A store that reads tasks back from one log overrides
        it to read them all in one pass."""
        events = await asyncio.gather(*(self.get(task_id) for task_id in task_ids))
        return {task_id: event for task_id, event in zip(task_ids, events, strict=True)
                if event is not None}

    @abc.abstractmethod
    def watch(self, task_id: str) -> AsyncIterator[ResultEvent]:
        """Every event of one task, from its first, then live, ending after its ``final``.

        Works from any process, before or after the task ran, within the TTL. May yield
        an event more than once (at-least-once); the core drops duplicates.
        """

    @abc.abstractmethod
    async def listen(self, task_name: str) -> AsyncIterator[ResultEvent]:
        """Subscribe to live events of every run of ``task_name`` (``"*"``: of every task),
        from any producer. Returns once the subscription is active, so that nothing
        published afterwards is missed; the iterator never ends by itself and unsubscribes
        when closed."""

