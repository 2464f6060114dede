"""From a URL to a backend: the scheme picks the class, imported only when first used.

The core knows backends only by the dotted path written here, so that importing ``qtasks``
imports no broker library. Third-party backends register under the entry-point groups
``qtasks.brokers`` and ``qtasks.results`` (name = URL scheme, value = ``module:Class``);
the class is constructed as ``Class(url, **options)``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from qtasks.errors import ConfigurationError
from qtasks.interfaces import Broker, ResultStore

Kind = Literal["brokers", "results"]

_BUILTIN: dict[Kind, dict[str, str]] = {
    "brokers": {
        "memory": "qtasks.brokers.memory:MemoryBroker",
        "amqp": "qtasks.brokers.rabbitmq:RabbitMQBroker",
        "amqps": "qtasks.brokers.rabbitmq:RabbitMQBroker",
        "nats": "qtasks.brokers.nats:NatsBroker",
        "tls": "qtasks.brokers.nats:NatsBroker",
    },
    "results": {
        "memory": "qtasks.results.memory:MemoryResultStore",
        "amqp": "qtasks.results.rabbitmq:RabbitMQResultStore",
        "amqps": "qtasks.results.rabbitmq:RabbitMQResultStore",
        "nats": "qtasks.results.nats:NatsResultStore",
        "tls": "qtasks.results.nats:NatsResultStore",
    },
}

_EXTRA_FOR = {"amqp": "rabbitmq", "amqps": "rabbitmq", "nats": "nats", "tls": "nats"}


#: URL query options whose values are secrets (NATS ``token``/``password``, TLS key
#: passwords): shown as ``***``.
_SECRET_OPTIONS = frozenset({"password", "token", "keyfile_password", "key_password"})


def redact(url: str) -> str:
    """The URL, or comma-separated list of URLs, fit for logs and error messages:
    passwords, bare tokens (``nats://TOKEN@host``) and secret query values replaced by
    ``***``. The one redaction every backend and the CLI use."""
    out = []
    for part in url.split(","):
        parts = urlsplit(part.strip())
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, host = netloc.rpartition("@")
            user, sep, _ = userinfo.partition(":")
            netloc = f"{user}:***@{host}" if sep else f"***@{host}"
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if netloc == parts.netloc and not any(k in _SECRET_OPTIONS for k, _ in pairs):
            out.append(part.strip())  # nothing to hide: as written (``memory://`` stays)
            continue
        query = "&".join(f"{k}=***" if k in _SECRET_OPTIONS else f"{k}={v}" for k, v in pairs)
        out.append(urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment)))
    return ",".join(out)


def scheme_of(url: str) -> str:
    scheme = urlsplit(url.split(",")[0].strip()).scheme.lower()
    if not scheme:
        raise ConfigurationError(f"backend URL {redact(url)!r} has no scheme (memory://, "
                                 "amqp://, nats:// ...)")
    return scheme


def _target(kind: Kind, scheme: str) -> str:
    for ep in entry_points(group=f"qtasks.{kind}"):
        if ep.name == scheme:
            return str(ep.value)
    try:
        return _BUILTIN[kind][scheme]
    except KeyError:
        known = ", ".join(sorted(_BUILTIN[kind]))
        raise ConfigurationError(
            f"no {kind[:-1] if kind == 'brokers' else 'result store'} for scheme {scheme!r}; "
            f"known: {known} (others register under the 'qtasks.{kind}' entry-point group)"
        ) from None


def load_class(kind: Kind, url: str) -> type[Any]:
    scheme = scheme_of(url)
    module_name, _, class_name = _target(kind, scheme).partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = _EXTRA_FOR.get(scheme)
        hint = f" (pip install 'qtasks[{extra}]')" if extra else ""
        raise ConfigurationError(
            f"backend for {scheme}:// cannot be imported: {exc}{hint}") from exc
    cls: type[Any] = getattr(module, class_name)
    return cls


def broker_from_url(url: str, **options: Any) -> Broker:
    broker: Broker = load_class("brokers", url)(url, **options)
    return broker


def results_from_url(url: str, **options: Any) -> ResultStore:
    store: ResultStore = load_class("results", url)(url, **options)
    return store
