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
from urllib.parse import urlsplit

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


def redact(url: str) -> str:
    """The URL with its password replaced, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


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
