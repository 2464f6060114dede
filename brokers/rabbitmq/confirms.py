"""A publishing channel (publisher confirms on) that outlives the moves of queue leaders.

On a cluster, when the node leading a quorum queue or a stream dies, RabbitMQ 3.10
elects another leader within a second or so, but a channel that published to the old one
keeps getting nacks for that queue, and a publish sent on a fresh channel before the
election may never be confirmed at all. Measured with a client failed over to another
node: every retry on the same channel was nacked for 20 s. So a publish that is nacked
or not confirmed in time is retried (by ``retrying``) on a fresh channel, and while the
connection is *unsettled* (``UNSETTLED_S`` after a loss, a reconnect or a nack) a confirm
is awaited only ``SHORT_CONFIRM_S``, doubled after each timeout in a row: a publish lost
in an election is sent again within a second instead of after ``publish_timeout``.
Sending again may store a message twice, which at-least-once delivery allows (readers
and workers take duplicates).
"""

from __future__ import annotations

import asyncio
import logging
import time

from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aio_pika.exceptions import DeliveryError
from aiormq import spec

from qtasks.brokers.rabbitmq.connection import AmqpConnection, quietly, send
from qtasks.errors import QTasksError

log = logging.getLogger(__name__)

#: Seconds after a loss, reconnect or nack during which confirms are awaited briefly.
UNSETTLED_S = 10.0
#: The first such wait; doubled after each timeout in a row, up to ``publish_timeout``.
SHORT_CONFIRM_S = 0.5


class ConfirmChannel:
    """The publishing channel of a backend, replaced by a fresh one when a publish on it
    is nacked or not confirmed in time."""

    def __init__(self, connection: AmqpConnection, what: str,
                 on_return_raises: bool = False) -> None:
        self.connection = connection
        self.what = what
        self.on_return_raises = on_return_raises
        self.channel: AbstractRobustChannel | None = None
        #: Publishes not confirmed in time, in a row (reset by a confirm).
        self._timeouts = 0
        self._lock = asyncio.Lock()

    async def open(self, connection: AbstractRobustConnection) -> None:
        self.channel = await connection.channel(on_return_raises=self.on_return_raises)

    def close(self) -> None:
        self.channel = None

    def confirm_timeout(self, requested: float | None) -> float | None:
        """How long to wait for a confirm: ``requested`` (None: no limit), but briefly
        while the connection is unsettled."""
        if time.monotonic() - self.connection.disturbed_at > UNSETTLED_S:
            return requested
        short: float = SHORT_CONFIRM_S * 2.0 ** min(self._timeouts, 10)
        return short if requested is None else min(requested, short)

    async def send(self, exchange: str, routing_key: str, body: bytes,
                   properties: spec.Basic.Properties, mandatory: bool,
                   timeout: float | None = None) -> None:
        """One publish and its confirm (``connection.send``); a nack or no confirm in
        time renews the channel, then raises for the caller to retry."""
        channel = self.channel
        if channel is None:
            raise QTasksError(f"the {self.what} is not started (or closed)")
        try:
            await send(channel, exchange, routing_key, body, properties, mandatory,
                       self.confirm_timeout(timeout))
        except (DeliveryError, TimeoutError) as exc:
            if isinstance(exc, DeliveryError):
                self.connection.disturbed()
            else:
                self._timeouts += 1
            await self.renew(channel, exc)
            raise
        self._timeouts = 0

    async def renew(self, failed: AbstractRobustChannel, why: BaseException) -> None:
        """A fresh channel in place of ``failed`` (once, however many publishes failed on
        it); the old one is closed, which fails its other unconfirmed publishes at once,
        for their callers to send again."""
        async with self._lock:
            if self.channel is not failed or self.connection.robust is None:
                return
            log.info("%s: a publish was %s; publishing on a fresh channel", self.what,
                     "nacked" if isinstance(why, DeliveryError) else "not confirmed in time")
            try:
                self.channel = await self.connection.robust.channel(
                    on_return_raises=self.on_return_raises)
            except Exception as exc:  # the connection is down: it restores ``failed``
                log.debug("no fresh channel yet (%s)", exc)
                return
        await quietly(failed.close())
