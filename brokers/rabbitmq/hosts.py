"""Several RabbitMQ hosts in one URL, and a robust connection that fails over among them.

A cluster's clients name every node: ``amqp://user:pass@h1:5672,h2:5672,h3:5672/vhost?…``
(or full URLs separated by commas, or a list of them). aio-pika connects to one URL; its
``RobustConnection`` reconnects to that same URL forever, so a client of a node that
died waited for that node to come back (10 to 15 s and more on a 3-node cluster).
``FailoverConnection`` is aio-pika's robust connection whose every (re)connection
attempt tries the hosts in turn, starting after the one it lost, each attempt bounded by
``host_timeout``: when the node a client is connected to dies, it is connected to the
next one as soon as that one answers. Everything else is aio-pika's own recovery:
channels, queues, bindings and consumers are restored on the new connection, publishes
whose confirm went with the old one are retried by their callers (at-least-once), and
deliveries whose channel died are redelivered by RabbitMQ.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, AuthenticationError
from yarl import URL

from qtasks.errors import ConfigurationError
from qtasks.registry import redact

#: How RabbitMQ refuses credentials: aio-pika's error, or aiormq's when the server closes
#: the connection during the handshake (what 3.x does for a wrong password). Retrying it
#: only hides the cause behind "cannot connect" for ``connect_timeout`` seconds.
REFUSED: tuple[type[BaseException], ...] = (
    AuthenticationError, aiormq.exceptions.ProbableAuthenticationError)

_ONE_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?:(?P<userinfo>[^@/?#]*)@)?"
                      r"(?P<hosts>[^/?#]*)(?P<rest>[^#]*)$")


def split_hosts(url: str | Sequence[str]) -> tuple[list[str], str]:
    """``url`` as one URL per host (scheme, credentials, host, port and vhost, no query)
    and the query of them all (merged, in order: a later URL's value wins).

    Accepted: ``amqp://u:p@h1:5672,h2:5672,h3/vh?q`` (hosts share the credentials and
    vhost), ``amqp://u:p@h1/vh,amqp://u:p@h2/vh?q`` (each its own credentials), or a list
    of URLs. Every host must name the same vhost: two vhosts are two deployments.
    """
    parts = [url] if isinstance(url, str) else list(url)
    if not parts or not all(isinstance(p, str) for p in parts):
        raise ConfigurationError(f"not an AMQP URL: {url!r}")
    chunks = [c.strip() for p in parts for c in p.split(",")]
    if all("://" in c for c in chunks):
        urls = chunks
    elif len(parts) == 1 and "://" in chunks[0] and not any("://" in c for c in chunks[1:]):
        urls = _expand(parts[0])
    else:
        raise ConfigurationError(
            f"cannot read AMQP URL {redact(','.join(parts))!r}: name several hosts as "
            "amqp://user:pass@h1:5672,h2:5672/vhost or as full URLs separated by commas")
    hosts: list[str] = []
    queries: list[str] = []
    for one in urls:
        split = urlsplit(one)
        if split.scheme not in ("amqp", "amqps"):
            raise ConfigurationError(f"not an AMQP URL: {redact(one)!r}")
        if len(urls) > 1 and not split.hostname:
            raise ConfigurationError(f"a host is missing in AMQP URL {redact(url_text(url))!r}")
        try:
            split.port  # noqa: B018 - raises for a port that is not a number
        except ValueError as exc:
            raise ConfigurationError(f"AMQP URL {redact(one)!r}: {exc}") from None
        hosts.append(urlunsplit(split._replace(query="", fragment="")))
        if split.query:
            queries.append(split.query)
    schemes = {urlsplit(h).scheme for h in hosts}
    vhosts = {urlsplit(h).path or "/" for h in hosts}
    if len(schemes) > 1 or len(vhosts) > 1:
        raise ConfigurationError(
            f"the hosts of AMQP URL {redact(url_text(url))!r} must share one scheme and one "
            f"vhost (found {sorted(schemes)} and {sorted(vhosts)})")
    return hosts, "&".join(queries)


def url_text(url: str | Sequence[str]) -> str:
    """``url`` as one string (a list joined with commas), for messages and ``redact``."""
    return url if isinstance(url, str) else ",".join(url)


def _expand(url: str) -> list[str]:
    """``amqp://u:p@h1,h2:5673/vh?q`` as one URL per host, each with the path and query."""
    found = _ONE_URL.match(url)
    if found is None:
        raise ConfigurationError(f"cannot read AMQP URL {redact(url)!r}")
    scheme, userinfo, hosts, rest = found.group("scheme", "userinfo", "hosts", "rest")
    names = [h.strip() for h in hosts.split(",")]
    if len(names) > 1 and not all(names):
        raise ConfigurationError(f"an empty host in AMQP URL {redact(url)!r}")
    auth = f"{userinfo}@" if userinfo is not None else ""
    return [f"{scheme}://{auth}{name}{rest}" for name in names]


class FailoverConnection(aio_pika.RobustConnection):
    """aio-pika's ``RobustConnection`` over several hosts: each (re)connection attempt
    tries them in turn, beginning with the one after the host last connected to (a
    random one at first, so that clients spread over the nodes)."""

    def __init__(self, urls: Sequence[str], **kwargs: Any) -> None:
        self.urls = [URL(u) for u in urls]
        self._next = random.randrange(len(self.urls))
        #: Which of ``urls`` the connection is on (or was last on).
        self.host_index = self._next
        super().__init__(self.urls[self._next], **kwargs)

    async def _RobustConnection__connect_transport(self) -> None:
        """The one connection attempt of aio-pika's reconnect loop, made once per host
        until one answers (the loop waits ``reconnect_interval`` only after a round in
        which none did). Refused credentials win over other errors: they need a fix."""
        attempt = aio_pika.RobustConnection._RobustConnection__connect_transport  # type: ignore[attr-defined]
        errors: list[BaseException] = []
        for _ in range(len(self.urls)):
            index = self._next
            self._next = (index + 1) % len(self.urls)
            self.url = self.urls[index]
            try:
                await attempt(self)
            except CONNECTION_EXCEPTIONS as exc:
                errors.append(exc)
                continue
            self.host_index = index
            return
        raise next((e for e in errors if isinstance(e, REFUSED)), errors[-1])
