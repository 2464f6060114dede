"""A worker's heartbeat on the control channel, so that anyone can keep the live set.

A worker says ``online`` when it starts consuming, then ``alive`` (``stopping`` once a
graceful stop has begun) every ``interval`` seconds, and ``offline`` once it has stopped:
each a full ``worker`` state (``qtasks.control.WorkerState``), signed when a key is set.
A listener (``qtasks.workers``) drops a worker that missed three heartbeats, by the
interval that worker announced, and removes one at once on its goodbye. Nothing is kept
by the broker: a listener that starts later learns of every worker within one interval,
or at once by pinging.

A beat that cannot be sent (the broker is away) is logged once, not every interval, and
never stops the worker: its listeners will count it lost, which is then the truth.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable

from qtasks.control import WorkerPhase, WorkerState
from qtasks.errors import ConfigurationError
from qtasks.protocol import encode

log = logging.getLogger(__name__)

#: Seconds between a worker's heartbeats unless told otherwise (``Worker(heartbeat=)``,
#: ``qtasks worker --heartbeat``): a killed worker is dropped within three of them.
DEFAULT_HEARTBEAT = 2.0
#: How long the goodbye may take at most: a stopping worker does not hang on a broker
#: that went away (its listeners will then drop it after three missed heartbeats).
GOODBYE_TIMEOUT = 2.0


def check_interval(seconds: float) -> float:
    """A heartbeat interval: a positive, finite number of seconds, else a clear error."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) \
            or not 0 < seconds < math.inf:
        raise ConfigurationError(f"heartbeat must be a positive number of seconds, "
                                 f"not {seconds!r}")
    return float(seconds)


class Heartbeat:
    """Sends what ``describe(phase)`` says about the worker: once ``online``, then every
    ``interval`` seconds (``describe(None)``: ``alive`` or ``stopping``, the worker
    knows), until cancelled; then ``goodbye()`` sends ``offline``."""

    def __init__(self, broadcast: Callable[[bytes], Awaitable[None]],
                 seal: Callable[[bytes], bytes],
                 describe: Callable[[WorkerPhase | None], WorkerState],
                 interval: float) -> None:
        self.broadcast = broadcast
        self.seal = seal
        self.describe = describe
        self.interval = check_interval(interval)
        #: Beats sent (the announcement and the goodbye included).
        self.sent = 0
        self._failing = False

    async def run(self) -> None:
        """Announce, then beat on a fixed schedule: a slow send does not shift the next
        beat, and a beat late because the loop was blocked is not followed by a burst of
        catching up (the next one comes a full interval later)."""
        loop = asyncio.get_running_loop()
        await self._send("online")
        due = loop.time()
        while True:
            due += self.interval
            await asyncio.sleep(max(0.0, due - loop.time()))
            due = max(due, loop.time())
            await self._send(None)

    async def goodbye(self) -> None:
        """``offline``, within ``GOODBYE_TIMEOUT``: listeners remove the worker at once."""
        await self._send("offline", timeout=GOODBYE_TIMEOUT)

    async def _send(self, phase: WorkerPhase | None, timeout: float | None = None) -> None:
        state = self.describe(phase)
        try:
            async with asyncio.timeout(timeout or self.interval):
                await self.broadcast(self.seal(encode(state)))
        except Exception as exc:  # the broker is away, or slower than a beat: go on
            if not self._failing:
                log.warning("worker %s could not send its %s heartbeat (%s: %s); it goes "
                            "on, and listeners may count it lost until the broker is back",
                            state.id, state.state, type(exc).__name__, exc)
            self._failing = True
            return
        if self._failing:
            log.info("worker %s sends its heartbeats again", state.id)
            self._failing = False
        self.sent += 1
