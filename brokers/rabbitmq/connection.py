"""One AMQP connection per backend object, and what both RabbitMQ backends do with it.

The broker and the result store each hold one ``AmqpConnection`` (their own, named by
role, so that an operator can tell them apart): it connects with backoff, runs the
backend's declarations once, closes itself again if they fail, and tells the backend's
parts when the robust connection is lost and comes back. The helpers below publish with
confirms, retry through reconnects and clean up without waiting forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast
from urllib.parse import urlsplit

import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aio_pika.exceptions import (
    AMQPConnectionError,
    ChannelClosed,
    ChannelInvalidStateError,
    DeliveryError,
    PublishError,
)
from aiormq import spec
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from qtasks.brokers.rabbitmq.hosts import REFUSED, FailoverConnection
from qtasks.brokers.rabbitmq.settings import AmqpSettings
from qtasks.errors import BrokerUnavailableError, ConfigurationError, QTasksError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Errors that mean "the connection or channel went away": wait for the robust connection
#: to come back and try again. A returned (unroutable) message is not one of them.
TRANSIENT: tuple[type[BaseException], ...] = (
    AMQPConnectionError, ChannelInvalidStateError, ConnectionError, OSError, TimeoutError,
)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (*REFUSED, PublishError)):
        return False
    # A nack (not a return) means the broker could not take the message right now.
    return isinstance(exc, TRANSIENT) or isinstance(exc, DeliveryError)


def connection_name(settings: AmqpSettings, role: str) -> str:
    """How the connection shows in ``rabbitmqctl list_connections`` and the management UI:
    the ``name`` option (default ``qtasks``), namespace, role, host, process and a token
    telling two connections of one process apart."""
    token = uuid.uuid4().hex[:6]
    return (f"{settings.name or 'qtasks'} {settings.prefix} {role} "
            f"{socket.gethostname()}:{os.getpid()}:{token}")


def _scrub(text: str, settings: AmqpSettings) -> str:
    for host in settings.hosts:
        password = urlsplit(host).password
        text = text.replace(password, "***") if password else text
    return text


async def connect(settings: AmqpSettings, name: str,
                  timeout: float | None = None) -> AbstractRobustConnection:
    """A robust connection (it reconnects and restores channels, queues, bindings and
    consumers by itself), retrying the first attempt with backoff for ``timeout``
    (default ``connect_timeout``) seconds: a worker started before its broker waits."""
    timeout = settings.connect_timeout if timeout is None else timeout
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_delay(timeout),
            wait=wait_exponential(multiplier=0.2, max=5.0),
            retry=retry_if_exception(is_transient),
            reraise=True,
        ):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    log.info("connecting to %s (attempt %d)", settings.display_url,
                             attempt.retry_state.attempt_number)
                return await _connect_once(settings, name)
    except REFUSED as exc:
        raise ConfigurationError(
            f"RabbitMQ at {settings.display_url} refused the credentials: "
            f"{_scrub(str(exc), settings)}") from None
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise BrokerUnavailableError(
            f"cannot connect to RabbitMQ at {settings.display_url} within "
            f"{timeout:g} s: {_scrub(str(exc), settings) or type(exc).__name__}"
        ) from None
    raise AssertionError("unreachable")  # pragma: no cover


async def _connect_once(settings: AmqpSettings, name: str) -> AbstractRobustConnection:
    """``aio_pika.connect_robust`` over every host of the URL (``FailoverConnection``),
    each attempt bounded by ``host_timeout``; the connection object is closed when the
    attempt fails: dropped unclosed, aio-pika's ``__del__`` makes a ``close()`` coroutine
    that, when the collector runs outside the event loop, is never awaited."""
    connection = FailoverConnection(settings.hosts, client_properties={"connection_name": name})
    try:
        await connection.connect(timeout=settings.host_timeout)
    except BaseException:
        await quietly(connection.close())
        raise
    return connection


async def send(channel: AbstractChannel, exchange: str, routing_key: str, body: bytes,
               properties: spec.Basic.Properties, mandatory: bool,
               timeout: float | None = None) -> None:
    """Publish on the channel's current underlying (aiormq) channel and wait for the
    confirm. aio-pika's ``Message`` and ``Exchange.publish`` layers cost more than the
    publish itself on the hot path (a worker publishes two events per task); a nack
    raises ``DeliveryError``, a return (``mandatory``) ``PublishError``.

    ``wait=False``: no separate wait for the frame to be written, since the confirm that
    is awaited comes after it anyway (every channel that publishes here has confirms).
    """
    # aiormq's own Channel: its abstract base does not declare ``wait``.
    underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
    await underlay.basic_publish(body, exchange=exchange, routing_key=routing_key,
                                 properties=properties, mandatory=mandatory, timeout=timeout,
                                 wait=False)


async def retrying(settings: AmqpSettings, what: str,
                   operation: Callable[[], Awaitable[T]]) -> T:
    """Run ``operation`` until it succeeds, retrying through reconnects with backoff for
    ``publish_timeout`` seconds; then raise ``BrokerUnavailableError``.

    A retried publish whose first confirm was lost in a connection drop may be stored
    twice: delivery is at-least-once, and consumers de-duplicate.
    """
    try:
        return await operation()  # the usual case, without the retry machinery's cost
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning("%s failed (%s: %s); retrying while RabbitMQ reconnects", what,
                    type(exc).__name__, exc)
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_delay(settings.publish_timeout),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            retry=retry_if_exception(is_transient),
            reraise=True,
        ):
            with attempt:
                return await operation()
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise BrokerUnavailableError(
            f"{what}: RabbitMQ at {settings.display_url} unavailable for "
            f"{settings.publish_timeout:g} s ({type(exc).__name__}: {exc})") from exc
    raise AssertionError("unreachable")  # pragma: no cover


def raise_if_refused(exc: BaseException, settings: AmqpSettings) -> None:
    """A declaration refused for other arguments becomes an error that says what to do."""
    if isinstance(exc, ChannelClosed) and "PRECONDITION_FAILED" in str(exc):
        raise ConfigurationError(
            f"RabbitMQ at {settings.display_url} refused a declaration: {exc}. A queue or "
            f"exchange of prefix {settings.prefix!r} exists with other arguments (another "
            "queue_type, max_priority or ttl): delete it or use another prefix") from exc


#: How RabbitMQ answers a declaration while a cluster forms, or has lost the majority a
#: quorum queue or stream needs: ``cluster_not_formed`` (541, closing the connection), a
#: node or Ra process down, a leader or stream coordinator not there (yet).
_FORMING = re.compile(r"cluster_not_formed|not_formed|nodedown|noproc|no_quorum|timeout|"
                      r"coordinator|leader|unavailable", re.IGNORECASE)
#: Seconds one declaration may take (RabbitMQ may hold a stream's declaration without a
#: majority for as long as it lacks one).
DECLARE_TIMEOUT = 10.0


def is_forming(exc: BaseException) -> bool:
    """A declaration failed for what time cures in a cluster: a lost connection, a
    declaration that timed out, or a cluster without the majority it needs (yet)."""
    if isinstance(exc, (*REFUSED, PublishError)) or "PRECONDITION_FAILED" in str(exc):
        return False
    return is_transient(exc) or isinstance(exc, TimeoutError) or (
        isinstance(exc, aiormq.exceptions.AMQPError) and bool(_FORMING.search(str(exc))))


def forming_error(settings: AmqpSettings, what: str, timeout: float,
                  exc: BaseException) -> BrokerUnavailableError:
    return BrokerUnavailableError(
        f"{what}: RabbitMQ at {settings.display_url} did not take it within {timeout:g} s "
        f"({type(exc).__name__}: {_scrub(str(exc), settings)}); quorum queues and streams "
        "need a majority of the cluster's nodes running and clustered")


async def declaring(connection: AmqpConnection, what: str,
                    operation: Callable[[], Awaitable[T]]) -> T:
    """Run a declaration, each try bounded by ``DECLARE_TIMEOUT``, retrying what
    ``is_forming`` (a cluster forming, a leader being elected, a reconnect) with backoff
    for ``connect_timeout`` seconds; then a ``BrokerUnavailableError`` naming the cause.
    Refused arguments are a ``ConfigurationError`` at once."""
    settings = connection.settings
    deadline = time.monotonic() + settings.connect_timeout
    pause = 0.1
    while True:
        try:
            async with asyncio.timeout(DECLARE_TIMEOUT):
                return await operation()
        except Exception as exc:
            raise_if_refused(exc, settings)
            if not is_forming(exc):
                raise
            if time.monotonic() + pause > deadline:
                raise forming_error(settings, what, settings.connect_timeout, exc) from exc
            log.info("%s failed (%s: %s); retrying", what, type(exc).__name__, exc)
        await asyncio.sleep(pause)
        pause = min(2 * pause, 2.0)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await connection.wait_up()


async def quietly(operation: Awaitable[object], timeout: float = 5.0) -> None:
    """Best-effort cleanup (cancel a consumer, close a channel): errors and a connection
    that never comes back are ignored, because a robust channel waits for its connection
    forever and a closing program must not."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            await operation


#: What a backend runs on a new connection before ``start`` returns (declarations,
#: channels of its own); a failure closes the connection again.
Setup = Callable[[AbstractRobustConnection], Awaitable[None]]


class AmqpConnection:
    """The one robust connection of a broker or a result store, shared by its parts.

    ``start`` connects once, whoever calls first, and runs every ``setup`` step on the new
    connection; a refused declaration becomes a ``ConfigurationError`` that says what to
    do. ``up`` is set while the connection is established; ``reconnect_listeners`` run
    each time aio-pika has re-established it (channels, queues, bindings and consumers
    restored), ``loss_listeners`` each time it is lost.
    """

    def __init__(self, settings: AmqpSettings, role: str) -> None:
        self.settings = settings
        #: As RabbitMQ lists the connection (``rabbitmqctl list_connections``).
        self.name = connection_name(settings, role)
        self.role = role
        self.robust: AbstractRobustConnection | None = None
        self.setup: list[Setup] = []
        self.reconnect_listeners: list[Callable[[], None]] = []
        self.loss_listeners: list[Callable[[], None]] = []
        self.up = asyncio.Event()
        #: How often the connection was re-established (for logs, metrics and tests).
        self.reconnects = 0
        #: When it was last lost, re-established or a publish nacked (``confirms``).
        self.disturbed_at = -1e9
        self._lock = asyncio.Lock()

    def disturbed(self) -> None:
        self.disturbed_at = time.monotonic()

    async def start(self) -> None:
        if self.robust is not None:
            return  # the hot path: publishers call this before every publish
        async with self._lock:
            if self.robust is not None:
                return
            settings = self.settings
            deadline = time.monotonic() + settings.connect_timeout
            pause = 0.2
            while True:
                connection = await connect(settings, self.name,
                                           max(1.0, deadline - time.monotonic()))
                try:
                    async with asyncio.timeout(DECLARE_TIMEOUT):
                        for step in self.setup:
                            await step(connection)
                    break
                except BaseException as exc:
                    await connection.close()
                    raise_if_refused(exc, settings)
                    if not isinstance(exc, Exception) or not is_forming(exc):
                        raise
                    if time.monotonic() + pause > deadline:
                        raise forming_error(settings, f"declaring the {self.role}'s "
                                            "exchanges and queues", settings.connect_timeout,
                                            exc) from exc
                    # A cluster forming or electing: a new connection (maybe to another
                    # node) declares again.
                    log.info("declaring on %s failed (%s: %s); retrying",
                             settings.display_url, type(exc).__name__, exc)
                await asyncio.sleep(pause)
                pause = min(2 * pause, 2.0)
            connection.close_callbacks.add(self._on_lost)
            connection.reconnect_callbacks.add(self._on_reconnect)
            self.robust = connection
            self.up.set()

    @property
    def live(self) -> AbstractRobustConnection:
        """The connection, or an error if it is not started or already closed."""
        if self.robust is None:
            raise QTasksError(f"the RabbitMQ connection {self.name!r} is not open "
                              "(call start(), and not after close())")
        return self.robust

    async def wait_up(self) -> None:
        """Until the robust connection is established again; an error if it is closed."""
        while not self.up.is_set():
            self.live  # noqa: B018 - raises once closed
            await self.up.wait()

    async def close(self) -> None:
        connection, self.robust = self.robust, None
        if connection is not None:
            await connection.close()

    def _on_lost(self, _connection: object, _exc: BaseException | None) -> None:
        self.up.clear()
        self.disturbed()
        for listener in self.loss_listeners:
            listener()

    def _on_reconnect(self, _connection: object) -> None:
        self.reconnects += 1
        self.disturbed()
        self.up.set()
        log.info("reconnected to %s as %r (%d reconnects)", self.settings.display_url,
                 self.name, self.reconnects)
        for listener in self.reconnect_listeners:
            listener()


class Background:
    """Tasks a backend starts and does not await (a recovery after a reconnect, an
    unbinding): held until they end, so that none is collected half-way, and cancelled
    together when the backend closes."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[None]] = set()

    def spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()


class OnAmqpConnection:
    """What the broker and the result store say of their ``AmqpConnection`` (for
    operators, logs and tests), and their ``start``."""

    connection: AmqpConnection

    @property
    def connection_name(self) -> str:
        """As RabbitMQ lists the connection (``rabbitmqctl list_connections``)."""
        return self.connection.name

    @property
    def reconnects(self) -> int:
        """How often the connection was re-established (for logs, metrics and tests)."""
        return self.connection.reconnects

    async def start(self) -> None:
        await self.connection.start()
