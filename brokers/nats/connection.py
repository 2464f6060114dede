"""What the NATS broker and the NATS result store share: URL and option parsing, one
connection with reconnect bookkeeping, name encoding and retrying of JetStream calls.

Private to ``qtasks.brokers.nats`` and ``qtasks.results.nats``. Names and options are
documented in ``docs/nats.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from qtasks.brokers.nats.client import CoalescingClient, PlaintextServerError
from qtasks.brokers.nats.pubacks import PubAcks
from qtasks.errors import BrokerUnavailableError, ConfigurationError
from qtasks.registry import redact

log = logging.getLogger("qtasks.nats")

T = TypeVar("T")

#: Every option a NATS backend accepts (URL query or keyword). The broker and the result
#: store accept them all, because one URL usually configures both, and each reads its own:
#: connection options, then broker (ack_wait ... dead_letter_ttl), then result store.
OPTIONS = frozenset({
    "prefix", "name", "replicas", "connect_timeout", "publish_timeout", "user", "password",
    "token", "creds", "nkeys_seed", "tls_ca", "tls_cert", "tls_key", "tls_hostname",
    "connect_options",
    "ack_wait", "max_deliver", "max_ack_pending", "fetch_timeout", "dead_letter_ttl",
    "ttl", "expect_timeout", "max_expected",
})
#: The server's -ERR for credentials it does not accept (wrong, expired, revoked).
_REFUSAL = re.compile(r"authori[sz]ation violation|authentication", re.IGNORECASE)
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+\Z")
_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def token(name: str) -> str:
    """``name`` as one subject token, valid in consumer names and KV keys too.

    Letters, digits, ``_`` and ``-`` stay; every other byte of the UTF-8 form becomes
    ``=XX`` (upper-case hex), so ``a.b`` is ``a=2Eb``: injective, and a task name with dots
    or spaces cannot add subject levels or wildcards. ``""`` becomes ``=``.
    """
    return name if _TOKEN_RE.match(name) else _escape(name)


@functools.lru_cache(maxsize=1024)  # task and queue names recur; ids take the fast path
def _escape(name: str) -> str:
    if not name:
        return "="
    return "".join(chr(b) if b in _SAFE else f"={b:02X}" for b in name.encode())


def parse_url(url: str, options: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Split ``nats://a:4222,nats://b:4222?prefix=x`` (or ``nats://a:4222,b:4222``) into
    server URLs and options. Keyword options win over the query; unknown names are refused
    so that a typo does not silently fall back to a default."""
    parts = [p.strip() for p in url.split(",") if p.strip()]
    if not parts:
        raise ConfigurationError("empty NATS URL")
    scheme = urlsplit(parts[0]).scheme or "nats"
    servers: list[str] = []
    merged: dict[str, Any] = {}
    for part in parts:
        split = urlsplit(part if "://" in part else f"{scheme}://{part}")
        merged.update(parse_qsl(split.query))
        servers.append(urlunsplit((split.scheme, split.netloc, "", "", "")))
    merged.update(options)
    unknown = set(merged) - OPTIONS
    if unknown:
        raise ConfigurationError(
            f"unknown NATS option(s) {', '.join(sorted(unknown))} in {redact(url)!r}; "
            f"known: {', '.join(sorted(OPTIONS))}")
    prefix = str(merged.get("prefix", "qtasks"))
    if not _NAME_RE.match(prefix):
        raise ConfigurationError(f"NATS prefix {prefix!r} must match [A-Za-z0-9_-]+")
    merged["prefix"] = prefix
    return servers, merged


def number(options: dict[str, Any], key: str, default: float) -> float:
    value = options.get(key, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"NATS option {key}={value!r} is not a number") from None


def _connect_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """The options that go to ``nats.connect``: credentials, NKeys, JWT creds, TLS.

    Checked here, once, rather than left to nats-py: it reads a creds file only inside
    its connect loop, which retries a missing file like a refused connection, and it
    imports ``nkeys`` only when it connects. Either mistake then looked like an unreachable
    server for ``connect_timeout`` seconds; here it is a ``ConfigurationError`` at once.
    """
    kwargs: dict[str, Any] = {}
    for ours, theirs in (("user", "user"), ("password", "password"), ("token", "token"),
                         ("creds", "user_credentials"), ("nkeys_seed", "nkeys_seed"),
                         ("tls_hostname", "tls_hostname")):
        if options.get(ours):
            kwargs[theirs] = options[ours]
    for key in ("creds", "nkeys_seed"):
        if options.get(key):
            _require_nkeys(key)
            _readable(key, str(options[key]))
    if options.get("tls_ca") or options.get("tls_cert"):
        try:
            context = ssl.create_default_context(cafile=options.get("tls_ca"))
            if options.get("tls_cert"):
                context.load_cert_chain(options["tls_cert"], options.get("tls_key"))
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigurationError(
                f"NATS TLS options tls_ca/tls_cert/tls_key: {type(exc).__name__}: {exc}"
            ) from None
        kwargs["tls"] = context
    kwargs.update(options.get("connect_options") or {})
    return kwargs


#: What to install for NKeys and JWT credentials, wherever their absence is found.
NKEYS_HINT = "pip install 'nats-py[nkeys]' (qtasks[nats] includes it)"


def _require_nkeys(option: str) -> None:
    try:
        importlib.import_module("nkeys")  # what nats-py imports to sign with a seed
    except ImportError as exc:
        raise ConfigurationError(
            f"NATS option {option} needs the nkeys package, which is missing ({exc}): "
            f"{NKEYS_HINT}") from None


def _readable(option: str, path: str) -> None:
    try:
        with open(path, "rb") as file:
            head = file.read(1 << 16) if option == "creds" else b""
    except OSError as exc:
        raise ConfigurationError(f"NATS option {option}: cannot read {path!r}: "
                                 f"{exc.strerror or exc}") from None
    # nats-py reads a creds file line by line until each block's marker, forever (the
    # event loop with it) if one is missing.
    for marker in (b"BEGIN NATS USER JWT", b"BEGIN USER NKEY SEED"):
        if option == "creds" and marker not in head:
            raise ConfigurationError(f"NATS option creds: {path!r} is not a credentials "
                                     f"file (no '-----{marker.decode()}-----' block)")


def requires_tls(servers: list[str], options: dict[str, Any]) -> bool:
    """Whether the connection must be encrypted: a ``tls://`` server or any TLS option.

    WebSocket URLs are left alone: ``wss://`` is TLS by its transport, ``ws://`` a
    deliberate choice, and neither goes through the INFO-driven upgrade this guards."""
    schemes = {urlsplit(server).scheme for server in servers}
    if schemes and schemes <= {"ws", "wss"}:
        return False
    return "tls" in schemes or any(options.get(key) for key in (
        "tls_ca", "tls_cert", "tls_key", "tls_hostname")) \
        or "tls" in (options.get("connect_options") or {})


def configuration_problem(exc: BaseException) -> str | None:
    """What is wrong with the configuration, if ``exc`` (out of ``nats.connect``) says
    so; ``None`` for what a retry may cure.

    nats-py retries its own errors, ``OSError`` and timeouts inside ``connect``, so what
    else escapes it (a missing ``nkeys`` module, an invalid seed, a keyword that
    ``connect`` does not take) comes from the configuration and fails the same way on
    every try: retrying it for ``connect_timeout`` only hid it behind "cannot connect"."""
    if isinstance(exc, ConfigurationError):
        return str(exc)
    if isinstance(exc, (asyncio.TimeoutError, nats.errors.Error, OSError)):
        return None
    if isinstance(exc, ImportError):
        return (f"{exc}: NKeys and JWT credentials (options creds, nkeys_seed) need "
                f"{NKEYS_HINT}")
    return f"{type(exc).__name__}: {exc}"


TRANSIENT: tuple[type[BaseException], ...] = (
    asyncio.TimeoutError,  # includes nats.errors.TimeoutError and FlushTimeoutError
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    ConnectionError,
)


def is_transient(exc: BaseException) -> bool:
    """True for what a server restart or a leader election causes and a retry cures."""
    if isinstance(exc, nats.js.errors.APIError) and getattr(exc, "code", None) in (503, 500):
        return True
    return isinstance(exc, TRANSIENT)


class Connection:
    """One NATS connection that reconnects forever and counts its reconnects.

    ``epoch`` grows on every disconnect and reconnect, so a component can tell whether
    something it sent with no confirmation (a core publish, a subscription) may have been
    lost in between. ``reconnect_listeners`` run after each reconnect.
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
        self._barrier: asyncio.Task[None] | None = None
        self.pubacks = PubAcks()
        #: Set once ``start`` has connected and declared; cleared by ``close``.
        self.started = False
        self._start_lock = asyncio.Lock()

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("NATS backend used before start()")
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
        kwargs = _connect_kwargs(self.options)
        require_tls = requires_tls(self.servers, self.options)
        self.refusal = None
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
        self.nc = nc
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
                        **options: Any) -> Subscription:
        """A core subscription already active on the server when this returns (a PING
        round trip), so nothing published afterwards is missed; removed again if that
        cannot be proven."""
        subscription = await self.nc.subscribe(subject, cb=handler, **options)
        try:
            await self.barrier()
        except BaseException:
            with contextlib.suppress(Exception):
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
                    timeout: float | None = None) -> T:
        """Run a JetStream call, retrying transient failures (server restart, leader
        election) with backoff for ``timeout`` seconds (default ``publish_timeout``)."""
        deadline = time.monotonic() + (self.publish_timeout if timeout is None else timeout)
        delay = 0.05
        while True:
            try:
                return await call()
            except Exception as exc:
                if self.nc.is_closed or not is_transient(exc) or time.monotonic() > deadline:
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
                                     lambda: js.add_stream(config), timeout=self.connect_timeout)
                    return
                except nats.js.errors.BadRequestError as exc:
                    # 10058: the name is in use with another config. 10065: the subjects
                    # overlap, which the server also answers while another process is
                    # creating this very stream; either way it is ours to bring to
                    # ``config`` if it exists by name. A stream being created may not
                    # answer yet (a cluster assigns it first): asked again before it is
                    # taken for a foreign one.
                    if exc.err_code not in (10058, 10065):
                        raise
                    if await self.retry(f"look up stream {config.name}",
                                        lambda: self._exists(config)):
                        await self.retry(f"update stream {config.name}",
                                         lambda: js.update_stream(config),
                                         timeout=self.connect_timeout)
                        return
                    if attempt == 2:
                        raise ConfigurationError(
                            f"cannot create stream {config.name}: another stream on "
                            f"{redact(self.url)} already takes its subjects "
                            f"{config.subjects}; choose another prefix or remove that "
                            "stream") from exc
                await asyncio.sleep(0.2 * (attempt + 1))
        except Exception as exc:
            if not is_transient(exc):
                raise
            raise BrokerUnavailableError(
                f"cannot create stream {config.name} on {redact(self.url)} within "
                f"{self.connect_timeout:g} s: {type(exc).__name__}: {exc} (is JetStream "
                "enabled? nats-server -js)") from None

    async def _exists(self, config: StreamConfig) -> bool:
        try:
            await self.js.stream_info(config.name or "")
        except nats.js.errors.NotFoundError:
            return False
        return True

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
        log.debug("NATS %s connection closed", self.role)


async def _close_quietly(nc: Client) -> None:
    try:
        if not nc.is_closed:
            await nc.close()
    except Exception as exc:  # closing a half-open client: nothing left to save
        log.debug("closing NATS client: %s", exc)

