"""A running task's hold on its message, which later deliveries of the same task join.

A broker gives a message out again while its first delivery still runs on this worker
when that delivery's lease was lost without the worker dying: RabbitMQ closed the channel
at its ``consumer_timeout`` (which also hands back every other unacked delivery of that
channel), a connection dropped and came back, NATS's ``ack_wait`` passed while heartbeats
could not get through; or a producer published the same task twice. Running it a second
time beside the first would do the work twice and race two finals. Instead the worker adds
the new delivery to the running one's ``Lease``, and the run settles every delivery it
holds with its one outcome, the newest first. Settling a delivery whose channel died is a
logged no-op (the ``Delivery`` contract), so what counts is the live one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from qtasks.interfaces import Delivery

log = logging.getLogger(__name__)


class Lease(Delivery):
    """Every delivery of one task attempt that reached this worker while it runs."""

    def __init__(self, delivery: Delivery) -> None:
        self.deliveries = [delivery]
        self.body = delivery.body
        self.redelivered = delivery.redelivered
        self.settling = False

    async def join(self, delivery: Delivery) -> bool:
        """Hold ``delivery`` too; False once the outcome is being settled (too late: the
        caller handles the copy on its own, and a redelivered one then finds the stored
        final). Deliveries this one replaces (``lost``) are let go now, freeing their
        prefetch slots, which a run held past several RabbitMQ ``consumer_timeout``s
        would otherwise pile up."""
        if self.settling:
            return False
        lost = [held for held in self.deliveries if held.lost]
        self.deliveries = [held for held in self.deliveries if held not in lost] + [delivery]
        for held in lost:
            try:
                await held.let_go()
            except Exception as exc:
                log.warning("letting go of a lost delivery failed: %s", exc)
        return True

    async def _settle(self, outcome: Callable[[Delivery], Awaitable[None]],
                      others: Callable[[Delivery], Awaitable[None]] | None = None) -> None:
        """``outcome`` for the newest delivery, then ``others`` (default: the same) for
        each older one."""
        self.settling = True
        newest, *older = reversed(self.deliveries)
        await outcome(newest)
        for delivery in older:
            try:
                await (others or outcome)(delivery)
            except Exception as exc:  # an older lease: its failure must not undo the outcome
                log.warning("settling an earlier delivery of the same task failed: %s", exc)

    async def ack(self) -> None:
        await self._settle(lambda delivery: delivery.ack())

    async def requeue(self) -> None:
        await self._settle(lambda delivery: delivery.requeue())

    async def retry_later(self, delay: float) -> None:
        await self._settle(lambda delivery: delivery.retry_later(delay))

    async def dead_letter(self, reason: str) -> None:
        """One dead letter, not one per copy: the others are settled as done with."""
        await self._settle(lambda delivery: delivery.dead_letter(reason),
                           lambda delivery: delivery.ack())

    async def keep_alive(self) -> None:
        for delivery in self.deliveries:
            await delivery.keep_alive()


async def keep_leases(interval: float | None,
                      held: Callable[[], Iterable[Delivery]]) -> None:
    """Every ``interval`` seconds (the broker's ``lease_interval``; None: never needed),
    extend the lease of every delivery a worker holds, so a long task is not handed to
    another worker. A failed extension is logged: the next one may get through."""
    if not interval:
        return
    while True:
        await asyncio.sleep(interval)
        results = await asyncio.gather(*(d.keep_alive() for d in list(held())),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.warning("lease keep-alive failed: %s", result)
