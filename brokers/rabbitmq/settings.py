"""The RabbitMQ backend's options and names, shared by the broker and the result store.

Both sides of a deployment (producers, workers, listeners, possibly in other languages)
must agree on every exchange and queue name and on the queue arguments, because RabbitMQ
refuses a declaration whose arguments differ from the existing queue's. So the names and
arguments are computed here, in one place, from the URL's ``prefix`` and options, and
written up in ``docs/rabbitmq.md``.
"""

from __future__ import annotations

import base64
import difflib
import math
import os
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import parse_qsl, urlencode

from qtasks.brokers.rabbitmq.hosts import split_hosts, url_text
from qtasks.errors import ConfigurationError
from qtasks.registry import redact

_NAME = re.compile(r"^[A-Za-z0-9_.:\-]+$")

def _readable_file(value: str) -> str:
    try:
        with open(value, "rb"):
            return value
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror or exc}") from None


def _directory(value: str) -> str:
    if not os.path.isdir(value):
        raise ValueError("not a directory")
    return value


#: The URL query options that aio-pika 10 / aiormq 7 act on, each with a check of its
#: value. They read the query themselves and ignore every other key, and aiormq turns an
#: unparsable number into 0 (``heartbeat=3O`` would turn heartbeats off): so ``parse``
#: refuses any other key and a bad value, and a typo such as ``queue_typ=quorum`` is an
#: error instead of a deployment silently left on the defaults. Read from
#: ``aiormq.connection.Connection.__init__`` and ``_credentials_class`` (TLS files,
#: ``heartbeat``, ``auth``) and ``aio_pika.Connection``/``RobustConnection.PARAMETERS``.
#: Not listed: ``timeout`` (aiormq 7 parses it and never uses it: ``connect_timeout`` is
#: the option), ``name`` (an option of ours, see ``AmqpSettings.name``) and
#: ``reconnect_interval`` (ours, handed on).
#: ``fail_fast`` is left out too: off, aio-pika's ``connect`` waits forever instead of
#: failing, bypassing ``connect_timeout``.
CONNECTION_OPTIONS: dict[str, Callable[[str], object]] = {
    # aiormq turns 65535 into 0, heartbeats off.
    "heartbeat": lambda v: _bounded_int(v, 0, 65534),
    "auth": lambda v: _one_of(v.upper(), ("PLAIN", "EXTERNAL")),
    # A file that cannot be read would be retried as a network fault until the timeout.
    "cafile": _readable_file, "certfile": _readable_file, "keyfile": _readable_file,
    "capath": _directory,
    # Bad base64 fails inside aio-pika's reconnect loop, which then never gives up.
    "cadata": lambda v: base64.b64decode(v, validate=True),
    # aiormq verifies the server only for "0": "false" would turn verification off.
    "no_verify_ssl": lambda v: _one_of(v, ("0", "1")),
    "interleave": lambda v: _bounded_int(v, 0, 1_000_000),
    "happy_eyeballs_delay": float,
}


def _bounded_int(value: str, low: int, high: int) -> int:
    number = int(value)
    if not low <= number <= high:
        raise ValueError(f"not between {low} and {high}")
    return number


def _one_of(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"not one of {', '.join(allowed)}")
    return value


@dataclass(slots=True)
class AmqpSettings:
    """Every option of the RabbitMQ backend; from the URL query, overridden by keywords.

    The same URL usually configures both the broker and the result store, so each accepts
    the other's options and ignores them.
    """

    prefix: str = "qtasks"
    #: ``classic`` (priorities, one node) or ``quorum`` (replicated; no priorities on 3.10).
    queue_type: str = "classic"
    #: ``x-max-priority`` of classic task queues; the app refuses priorities above it.
    max_priority: int = 10
    #: A worker's ``basic.qos``: how many task messages RabbitMQ hands it ahead of their
    #: acks (Celery's prefetch count). 0: the ``prefetch`` of the ``consume`` call, which
    #: the worker sets to its concurrency. The worker still runs at most that many at
    #: once: a larger value keeps the rest waiting unacked in its buffer (fewer round
    #: trips for short tasks), a smaller one caps how many tasks it runs at once.
    prefetch: int = 0
    #: Deliveries of one task message before it is dead-lettered (a poison message that
    #: crashes every worker it reaches must end somewhere).
    delivery_limit: int = 10
    #: Seconds results stay readable (the stream's ``x-max-age``).
    ttl: float = 86400.0
    #: Seconds before a task id's UUIDv7 time from which a late reader scans the stream;
    #: covers clock skew between the producer's host and the broker.
    stream_margin: float = 10.0
    #: The server's ``consumer_timeout`` in seconds (3.10 default: 30 min). Only used to
    #: warn before the server closes the channel of a task that runs longer.
    consumer_timeout: float = 1800.0
    #: Seconds a publish keeps retrying through reconnects before it fails.
    publish_timeout: float = 30.0
    #: Seconds the first connection keeps retrying before ``start`` fails.
    connect_timeout: float = 30.0
    #: Seconds between reconnection attempts of an established connection (after a round
    #: in which no host answered: the next host is tried at once).
    reconnect_interval: float = 1.0
    #: Seconds one connection attempt to one host may take (TCP, TLS and AMQP handshakes)
    #: before the next host is tried: a frozen node accepts TCP and never answers.
    host_timeout: float = 5.0
    #: Leads the name each connection shows in ``rabbitmqctl list_connections`` and the
    #: management UI (default ``qtasks``). aiormq's own ``name`` query option would be
    #: overridden by that name, so it is an option of ours.
    name: str = ""
    #: The URL handed to aio-pika (our options removed), and the same with no password.
    connection_url: str = ""
    display_url: str = ""
    #: One such URL per host (``connection_url`` is the first).
    hosts: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, url: str | Sequence[str], options: Mapping[str, Any]) -> AmqpSettings:
        """From a URL naming one host or several (``hosts.split_hosts``) and keywords."""
        hosts, query = split_hosts(url)
        known = {f.name for f in fields(cls)} - {"connection_url", "display_url", "hosts"}
        unknown = set(options) - known
        if unknown:
            raise ConfigurationError(
                f"unknown RabbitMQ option(s) {sorted(unknown)}; known: {sorted(known)}")
        ours: dict[str, Any] = {}
        passed: dict[str, str] = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key in known:
                ours[key] = value
            elif key in CONNECTION_OPTIONS:
                _check_connection_option(key, value)
                passed[key] = value
            else:
                raise ConfigurationError(_unknown_query_option(key, known))
        ours.update(options)
        settings = cls()
        for f in fields(cls):
            if f.name in ours:
                default = getattr(settings, f.name)
                try:
                    setattr(settings, f.name, type(default)(ours[f.name]))
                except (TypeError, ValueError):
                    raise ConfigurationError(
                        f"RabbitMQ option {f.name}={ours[f.name]!r} is not a "
                        f"{type(default).__name__}") from None
        passed["reconnect_interval"] = str(settings.reconnect_interval)
        settings.hosts = [f"{host}?{urlencode(passed)}" for host in hosts]
        settings.connection_url = settings.hosts[0]
        settings.display_url = redact(url_text(url))
        settings.validate()
        return settings

    def validate(self) -> None:
        if not _NAME.match(self.prefix):
            raise ConfigurationError(
                f"prefix {self.prefix!r} must be non-empty letters, digits, '_', '.', ':', '-'")
        if self.queue_type not in ("classic", "quorum"):
            raise ConfigurationError(
                f"queue_type must be 'classic' or 'quorum', not {self.queue_type!r}")
        if not 0 <= self.max_priority <= 255:
            raise ConfigurationError("max_priority must be between 0 and 255")
        if self.delivery_limit < 1 or self.ttl <= 0:
            raise ConfigurationError("delivery_limit and ttl must be positive")
        if self.host_timeout <= 0 or self.connect_timeout <= 0:
            raise ConfigurationError("host_timeout and connect_timeout must be positive")
        if not 0 <= self.prefetch <= 65535:
            raise ConfigurationError(
                "prefetch must be between 0 and 65535 (0: the worker's concurrency)")

    # -- names: every one starts with the prefix -----------------------------------------

    @property
    def tasks_exchange(self) -> str:
        return f"{self.prefix}.tasks"

    def work_queue(self, queue: str) -> str:
        if not queue or len(queue) > 200:
            raise ConfigurationError(f"queue name {queue!r} must have 1 to 200 characters")
        return f"{self.prefix}.q.{queue}"

    def delay_queue(self, queue: str, ttl_ms: int) -> str:
        return f"{self.prefix}.delay.{queue}.{ttl_ms}"

    @property
    def dead_exchange(self) -> str:
        return f"{self.prefix}.dlx"

    @property
    def dead_queue(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def results_exchange(self) -> str:
        return f"{self.prefix}.results"

    @property
    def stream_queue(self) -> str:
        return f"{self.prefix}.results.stream"

    def private_queue(self, kind: str) -> str:
        """An exclusive queue of this process (reply inbox, listener)."""
        return f"{self.prefix}.{kind}.{uuid.uuid4().hex}"

    # -- arguments: producers in other languages must declare the same ------------------

    def work_queue_arguments(self) -> dict[str, Any]:
        args: dict[str, Any] = {"x-dead-letter-exchange": self.dead_exchange}
        if self.queue_type == "quorum":
            args.update({"x-queue-type": "quorum", "x-delivery-limit": self.delivery_limit,
                         "x-dead-letter-strategy": "at-least-once",
                         "x-overflow": "reject-publish"})
        elif self.max_priority:
            args["x-max-priority"] = self.max_priority
        return args

    def delay_queue_arguments(self, queue: str, ttl_ms: int) -> dict[str, Any]:
        args: dict[str, Any] = {
            "x-message-ttl": ttl_ms,
            "x-expires": ttl_ms + DELAY_QUEUE_IDLE_MS,
            "x-dead-letter-exchange": self.tasks_exchange,
            "x-dead-letter-routing-key": queue,
        }
        if self.queue_type == "quorum":
            args.update({"x-queue-type": "quorum", "x-dead-letter-strategy": "at-least-once",
                         "x-overflow": "reject-publish"})
        return args

    def dead_queue_arguments(self) -> dict[str, Any]:
        return {"x-queue-type": "quorum"} if self.queue_type == "quorum" else {}

    def stream_arguments(self) -> dict[str, Any]:
        return {"x-queue-type": "stream", "x-max-age": f"{max(1, math.ceil(self.ttl))}s",
                # Age-based retention drops whole segments; smaller ones expire closer to
                # the TTL (the default is 500 MB).
                "x-stream-max-segment-size-bytes": 50_000_000}


#: A delay queue lives this long after its last declaration beyond its TTL. Publishing does
#: not count as use for ``x-expires``, so publishers redeclare at least every
#: ``DELAY_REDECLARE_S`` seconds: the queue then outlives every message put in it.
DELAY_QUEUE_IDLE_MS = 60_000
DELAY_REDECLARE_S = 30.0


def delay_bucket_ms(delay: float, digits: int, up: bool) -> int:
    """``delay`` in milliseconds, rounded to ``digits`` significant digits.

    One delay queue per rounded value: every message in a queue has the same TTL, so none
    waits behind a longer one (no head-of-line blocking), and rounding keeps the number of
    queues small (at most 9*10**(digits-1) per decade).
    """
    exact = delay * 1000.0
    ms = max(1, math.ceil(exact) if up else math.floor(exact))
    step = int(10 ** max(0, len(str(ms)) - digits))
    return max(1, (math.ceil(ms / step) if up else ms // step) * step)


def _check_connection_option(key: str, value: str) -> None:
    try:
        CONNECTION_OPTIONS[key](value)
    except ValueError as exc:
        raise ConfigurationError(
            f"RabbitMQ URL option {key}={value!r} is invalid: {exc}") from None


def _unknown_query_option(key: str, known: set[str]) -> str:
    """The error for a query key neither QTasks nor aio-pika reads, with the likely
    intended one first: the list of every option is long."""
    candidates = sorted(known | set(CONNECTION_OPTIONS))
    close = difflib.get_close_matches(key, candidates, n=2)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return (f"unknown RabbitMQ URL option {key!r}{hint}; QTasks options: {sorted(known)}; "
            f"connection options (aio-pika): {sorted(CONNECTION_OPTIONS)}")


def topic_word(task_id: str) -> str:
    """A task id as one word of a topic routing key (dots become ``_``), so that the
    ``{task}.*`` and ``#.{id}`` bindings of result readers match it."""
    return task_id.replace(".", "_")


def result_routing_key(task: str, task_id: str) -> str:
    """The routing key of a task's result events on ``{prefix}.results``."""
    return f"{task}.{topic_word(task_id)}"
