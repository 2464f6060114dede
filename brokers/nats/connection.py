"""One NATS connection shared by a backend's parts: reconnect bookkeeping (``epoch``),
a client the server closed for good opened again, JetStream publishes confirmed by
PubAck, barriers, subscriptions, and retrying of JetStream calls.

Private to ``qtasks.brokers.nats`` and ``qtasks.results.nats``; options and URLs are
parsed in ``settings``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from qtasks.brokers.nats.client import CoalescingClient, PlaintextServerError
from qtasks.brokers.nats.pubacks import PubAcks
from qtasks.brokers.nats.settings import (
    configuration_problem,
    connect_kwargs,
    forming_hint,
    is_forming,
    is_transient,
    number,
    requires_tls,
)
from qtasks.errors import BrokerUnavailableError, ConfigurationError
from qtasks.registry import redact

log = logging.getLogger(__name__)

#: The server's -ERR for credentials it does not accept (wrong, expired, revoked).
_REFUSAL = re.compile(r"authori[sz]ation violation|authentication", re.IGNORECASE)

T = TypeVar("T")

class NotStartedError(BrokerUnavailableError):
    """A NATS backend was used before ``start()``."""


class Subscribed:
    """A core subscription made through ``Connection.subscribe``; made again on the new
    client if the connection is reopened (``Connection.reopen``)."""

    __slots__ = ("conn", "handler", "options", "sub", "subject")

    def __init__(self, conn: Connection, subject: str,
                 handler: Callable[[Msg], Awaitable[None]], options: dict[str, Any]) -> None:
        self.conn, self.subject, self.handler, self.options = conn, subject, handler, options
        self.sub: Subscription | None = None

    async def renew(self) -> None:
        self.sub = await self.conn.nc.subscribe(self.subject, cb=self.handler, **self.options)

    async def unsubscribe(self) -> None:
        self.conn.subscriptions.discard(self)
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()


class Connection:
    """One NATS connection that reconnects forever and counts its reconnects.

    ``epoch`` grows on every disconnect and reconnect, so a component can tell whether
    something it sent with no confirmation (a core publish, a subscription) may have been
    lost in between. ``reconnect_listeners`` run after each reconnect, and after the
    connection was opened again because the client had closed it for good (``reopen``).
    """

    def __init__(self, url: str, servers: list[str], options: dict[str, Any], role: str) -> None:
        self.url = url
        self.servers = servers
        self.options = options
        self.role = role
        self.nc = CoalescingClient()
        self.epoch = 0
        self.reconnect_listeners: list[Callable[[], None]] = []
        self.slow_consumer_listeners: list[Callable[[Subscription], None]] = []
        self._slow_reported: set[int] = set()
        self.connect_timeout = number(options, "connect_timeout", 30.0)
        self.publish_timeout = number(options, "publish_timeout", 30.0)
        self._js: JetStreamContext | None = None
        self._closing = False
        self.last_error: Exception | None = None
        #: The server's refusal of our credentials during the current ``open``, if any.
        self.refusal: Exception | None = None
        self.opening = False  # inside ``open``: a refusal ends it at once
        self._barrier: asyncio.Task[None] | None = None
        self.pubacks = PubAcks()
        #: Set once ``start`` has connected and declared; cleared by ``close``.
        self.started = False
        self._start_lock = asyncio.Lock()
        #: Core subscriptions to make again on a reopened client.
        self.subscriptions: set[Subscribed] = set()
        self._reopening: asyncio.Task[None] | None = None

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise NotStartedError("NATS backend used before start()")
        return self._js

    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload)

    async def open(self) -> None:
        """Connect, retrying for ``connect_timeout`` seconds, then reconnect forever.

        What no retry can cure (see ``configuration_problem``) is raised at once as a
        ``ConfigurationError``. With a ``tls://`` URL or a TLS option, a server that
        does not offer TLS is refused (see ``CoalescingClient.require_tls``), and the
        connection made is checked to be encrypted, so a misconfigured server never
        receives credentials or tasks in clear."""
        deadline = time.monotonic() + self.connect_timeout
        delay = 0.1
        self._closing = False
        kwargs = connect_kwargs(self.options)
        require_tls = requires_tls(self.servers, self.options)
        self.refusal, self.opening = None, True
        while True:
            nc = CoalescingClient()
            nc.require_tls = require_tls
            self.last_error = None
            try:
                await asyncio.wait_for(nc.connect(
                    servers=self.servers, name=self.options.get("name") or f"qtasks-{self.role}",
                    allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=1,
                    connect_timeout=2, error_cb=self._on_error,
                    disconnected_cb=self._on_disconnect, reconnected_cb=self._on_reconnect,
                    closed_cb=self._on_closed, **kwargs,
                ), timeout=max(0.5, min(5.0, deadline - time.monotonic())))
                break
            except Exception as exc:
                await _close_quietly(nc)
                problem = configuration_problem(exc)
                if problem is None and nc.plaintext_refused:  # and no server took us
                    problem = (f"each of {', '.join(sorted(nc.plaintext_refused))} does not "
                               "offer TLS, but TLS was asked for (a tls:// URL or a tls_* "
                               "option): refusing to connect unencrypted")
                if problem is not None:
                    raise ConfigurationError(
                        f"cannot connect to NATS at {redact(self.url)}: {problem}") from None
                cause = self.last_error or exc  # nats-py retries inside connect: say why
                if time.monotonic() + delay > deadline:
                    # A refusal is what to fix, even if a reset of the refused connection
                    # came after it.
                    why = ("the server refused the credentials: " if self.refusal else "") + \
                        f"{type(self.refusal or cause).__name__}: {self.refusal or cause}"
                    raise BrokerUnavailableError(
                        f"cannot connect to NATS at {redact(self.url)} within "
                        f"{self.connect_timeout:g} s: {why}") from None
                log.warning("NATS at %s not reachable (%s: %s); retrying", redact(self.url),
                            type(cause).__name__, cause)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        if require_tls and not nc.uses_tls:  # CoalescingClient refuses first; make sure
            await _close_quietly(nc)
            raise ConfigurationError(
                f"NATS at {redact(self.url)}: connected without TLS although TLS was asked "
                "for (a tls:// URL or a tls_* option); refusing to use the connection")
        self.nc, self.opening = nc, False
        self._js = nc.jetstream(timeout=5.0)
        self.pubacks = PubAcks()
        await self.pubacks.start(nc)

    async def start(self, declare: Callable[[], Awaitable[None]]) -> None:
        """Connect and run ``declare`` (streams, buckets) once, whoever calls first.
        If either fails, the connection is closed (no client left reconnecting in the
        background) and the next call tries again."""
        if self.started:
            return  # the hot path: publishers call this before every publish
        async with self._start_lock:
            if self.started:
                return
            try:
                await self.open()
                await declare()
            except BaseException:
                await self._close()
                raise
            self.started = True

    async def publish(self, subject: str, body: bytes, headers: dict[str, str] | None = None,
                      stream: str | None = None) -> None:
        """A JetStream publish, returning once stored (``js.publish``, but cheaper: see
        ``brokers/_nats_pubacks.py``). Combine with ``retry``."""
        await self.pubacks.publish(subject, body, headers, stream)

    async def barrier(self, timeout: float = 5.0) -> None:
        """Return once the server has processed everything sent on this connection so far
        (a PING/PONG). Concurrent callers share one PING: each joins the next PING not yet
        sent, which therefore follows what they sent."""
        if self._barrier is None:
            self._barrier = asyncio.get_running_loop().create_task(self._ping(timeout))
        await asyncio.shield(self._barrier)

    async def subscribe(self, subject: str, handler: Callable[[Msg], Awaitable[None]],
                        **options: Any) -> Subscribed:
        """A core subscription already active on the server when this returns (a PING
        round trip), so nothing published afterwards is missed; removed again if that
        cannot be proven. It follows reconnects and a reopened client."""
        subscription = Subscribed(self, subject, handler, options)
        await subscription.renew()
        self.subscriptions.add(subscription)
        try:
            await self.barrier()
        except BaseException:
            await subscription.unsubscribe()
            raise
        return subscription

    async def _ping(self, timeout: float) -> None:
        await asyncio.sleep(0)  # let the other callers of this loop turn join
        self._barrier = None  # from here on, a caller needs the next PING
        if not self.nc.is_connected:
            # nats-py's flush returns at once while it reconnects, which proves nothing.
            raise nats.errors.ConnectionReconnectingError
        await self.nc.flush(timeout=timeout)  # type: ignore[arg-type]

    async def close(self) -> None:
        """Flush what is buffered, then close. Under the start lock: a ``start`` racing
        with it opens a new client after this one is closed, not one that this closes."""
        async with self._start_lock:
            await self._close()

    async def _close(self) -> None:
        self.started = False
        if self._reopening is not None:
            self._reopening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reopening
            self._reopening = None
        await self.pubacks.stop()
        nc = self.nc
        if nc.is_closed:
            return
        self._closing = True
        try:
            if nc.is_connected:
                await nc.flush(timeout=5)
        except Exception as exc:
            log.warning("NATS %s: flush before close failed: %s", self.role, exc)
        await _close_quietly(nc)

    async def retry(self, what: str, call: Callable[[], Awaitable[T]],
                    timeout: float | None = None,
                    transient: Callable[[BaseException], bool] = is_transient) -> T:
        """Run a JetStream call, retrying transient failures (server restart, leader
        election; ``is_forming`` at start-up) with backoff for ``timeout`` seconds
        (default ``publish_timeout``)."""
        deadline = time.monotonic() + (self.publish_timeout if timeout is None else timeout)
        delay = 0.05
        while True:
            try:
                return await call()
            except Exception as exc:
                # A client closed for good is no reason to stop while it is being reopened.
                reopening = self._reopening is not None and not self._reopening.done()
                if (not reopening and (self.nc.is_closed or not transient(exc))) \
                        or time.monotonic() > deadline:
                    raise
                log.info("NATS %s: %s failed (%s: %s); retrying", self.role, what,
                         type(exc).__name__, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def ensure_stream(self, config: StreamConfig) -> None:
        """Create the stream, or bring an existing one to ``config`` (another process may
        have made it first, or an older version with other limits)."""
        js = self.js
        try:
            for attempt in range(3):
                try:
                    await self.retry(f"create stream {config.name}",
                                     lambda: js.add_stream(config), timeout=self.connect_timeout,
                                     transient=is_forming)
                    return
                except nats.js.errors.BadRequestError as exc:
                    # 10058: name in use with another config; 10065: subjects overlap (also
                    # answered while another process creates this very stream). Ours to
                    # update if it exists by name; asked again before taken for foreign.
                    if exc.err_code not in (10058, 10065):
                        raise
                    if await self.retry(f"look up stream {config.name}",
                                        lambda: self._exists(config)):
                        await self.retry(f"update stream {config.name}",
                                         lambda: js.update_stream(config),
                                         timeout=self.connect_timeout, transient=is_forming)
                        return
                    if attempt == 2:
                        raise ConfigurationError(
                            f"cannot create stream {config.name}: another stream on "
                            f"{redact(self.url)} already takes its subjects "
                            f"{config.subjects}; choose another prefix or remove that "
                            "stream") from exc
                await asyncio.sleep(0.2 * (attempt + 1))
        except Exception as exc:
            if not is_forming(exc):
                raise
            raise BrokerUnavailableError(
                f"cannot create stream {config.name} on {redact(self.url)} within "
                f"{self.connect_timeout:g} s: {type(exc).__name__}: {exc}"
                f"{forming_hint(exc)}") from None

    async def _exists(self, config: StreamConfig) -> bool:
        try:
            return bool(await self.js.stream_info(config.name or ""))
        except nats.js.errors.NotFoundError:
            return False

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            if exc.sid not in self._slow_reported:  # once per subscription, not per message
                self._slow_reported.add(exc.sid)
                log.warning("NATS %s: slow consumer on %s: messages dropped", self.role,
                            exc.subject)
            for listener in list(self.slow_consumer_listeners):
                listener(exc.sub)
            return
        self.last_error = exc
        if _REFUSAL.search(str(exc)) or isinstance(exc, nats.errors.AuthorizationError):
            self.refusal = exc
            if self.opening:  # refused credentials never get better: end nats-py's loop
                raise ConfigurationError(
                    f"the server refused the credentials: {type(exc).__name__}: {exc}")
        # While reconnecting, each failed attempt reports here: routine, not a warning,
        # except a server refused for not offering TLS, which someone must fix.
        level = logging.WARNING if self.nc.is_connected \
            or isinstance(exc, PlaintextServerError) else logging.INFO
        log.log(level, "NATS %s error (%s): %s: %s", self.role, redact(self.url),
                type(exc).__name__, exc)

    async def _on_disconnect(self) -> None:
        self.epoch += 1
        # Their PubAcks, if any, went with the connection: retried at once, not after
        # the timeout.
        self.pubacks.fail_all(nats.errors.ConnectionReconnectingError())
        if self._closing:
            return
        log.warning("NATS %s disconnected from %s; reconnecting", self.role, redact(self.url))

    async def _on_reconnect(self) -> None:
        self.epoch += 1
        log.warning("NATS %s reconnected to %s", self.role, redact(self.url))
        for listener in list(self.reconnect_listeners):
            listener()

    async def _on_closed(self) -> None:
        if self._closing or not self.started or not self.nc.is_closed or \
                (self._reopening is not None and not self._reopening.done()):
            log.debug("NATS %s connection closed", self.role)
            return
        log.error("NATS %s: the client closed its connection to %s for good (%s); opening "
                  "it again", self.role, redact(self.url), self.nc.last_error)
        self._reopening = asyncio.get_running_loop().create_task(
            self.reopen(), name=f"qtasks-nats-reopen-{self.role}")

    async def reopen(self) -> None:
        """Open a new client in place of one closed for good, retrying until it connects
        (or ``close``), then make every subscription again and tell the listeners, as
        after a reconnect: what was sent on the old client may be lost."""
        delay = 0.5
        await self.pubacks.stop()  # fails their publishes: retried on the new client
        while True:
            try:
                await self.open()
                for subscription in list(self.subscriptions):
                    await subscription.renew()
                break
            except Exception as exc:
                await _close_quietly(self.nc)
                log.warning("NATS %s: cannot open the connection again yet (%s: %s)",
                            self.role, type(exc).__name__, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.epoch += 1
        log.warning("NATS %s: connection to %s opened again", self.role, redact(self.url))
        for listener in list(self.reconnect_listeners):
            listener()


async def _close_quietly(nc: Client) -> None:
    try:
        await (nc.close() if not nc.is_closed else asyncio.sleep(0))
    except Exception as exc:  # closing a half-open client: nothing left to save
        log.debug("closing NATS client: %s", exc)

