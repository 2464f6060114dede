"""NATS settings shared by the broker and the result store: the URL and its options,
the keyword arguments of ``nats.connect`` (credentials, NKeys, JWT creds, TLS), and the
encoding of names into subject tokens.

Private to ``qtasks.brokers.nats`` and ``qtasks.results.nats``. Names and options are
documented in ``docs/nats.md``.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import re
import ssl
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import nats.errors
import nats.js.errors

from qtasks.errors import ConfigurationError
from qtasks.registry import redact

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


def connect_kwargs(options: dict[str, Any]) -> dict[str, Any]:
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


#: JetStream API errors of a cluster still forming (or missing a server) when streams,
#: buckets and consumers are declared, with what they mean. A replicated stream is
#: placed on as many servers as its replicas: right after a cluster starts, or while one
#: of three servers is down, there are not enough JetStream peers yet.
FORMING: dict[int, str] = {
    10005: "too few JetStream servers in the cluster for the stream's replicas yet",
    10023: "the JetStream servers lack resources to place the stream (yet)",
    10008: "JetStream is not available yet (no meta leader elected)",
}


def is_forming(exc: BaseException) -> bool:
    """``is_transient``, or an error of a cluster still forming (``FORMING``): at start-up,
    retried with backoff within ``connect_timeout``."""
    return is_transient(exc) or (isinstance(exc, nats.js.errors.APIError)
                                 and getattr(exc, "err_code", None) in FORMING)


def forming_hint(exc: BaseException) -> str:
    """What a start-up error means, for the error raised once the retries are over."""
    hint = FORMING.get(getattr(exc, "err_code", None) or 0)
    return f" ({hint}: are all servers of the cluster up and routed to each other?)" \
        if hint else (" (is JetStream enabled, nats-server -js? In a cluster, are most of "
                      "its servers up, with a meta leader elected?)")
