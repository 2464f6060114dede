"""The overview's figures: each queue's depth, in-flight count and consumers, the dead
letters and the live workers, read every few seconds while a browser watches.

The same figures as ``qtasks inspect``: the broker's own counts, and what the broker
cannot say (RabbitMQ's in-flight count, how many workers share a NATS consumer) from the
live workers' own figures. The queues are read once per interval for the whole dashboard
process, whatever the number of browsers, and not at all when none is open; the live
workers are followed all along from their heartbeats (one ping at the start, so that
those already running show at once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from qtasks.app import QueueTasks
from qtasks.errors import NotSupportedError
from qtasks.interfaces import close_iterator
from qtasks.workers import LiveWorker

log = logging.getLogger(__name__)


class WorkerWatch:
    """The live workers, kept by following their announcements and heartbeats
    (``app.watch_workers()``): a worker appears when it starts, goes on a goodbye, and is
    dropped after three missed heartbeats. ``on_change`` hears of a worker that joined,
    left or was lost at once; a heartbeat only refreshes the figures."""

    def __init__(self, app: QueueTasks, on_change: Callable[[str, dict[str, Any]], None]
                 ) -> None:
        self.app = app
        self.on_change = on_change
        self.live: list[LiveWorker] = []
        self.supported = True

    def current(self) -> list[dict[str, Any]]:
        now = time.time()
        return [worker.to_dict(now) for worker in self.live]

    async def run(self) -> None:
        """Follow the control channel; subscribe again (waiting longer each time, up to
        10 s) when it fails, as the hub does."""
        pause = 0.5
        while True:
            changes = self.app.watch_workers()
            try:
                async for change in changes:
                    self.live = list(change.workers)
                    pause = 0.5
                    if change.event != "updated":
                        self.on_change(change.event, change.worker.to_dict())
            except NotSupportedError:
                self.supported = False
                return  # a broker without a control channel: no workers to show
            except Exception as exc:
                log.warning("the dashboard lost the workers' channel (%s: %s); subscribing "
                            "again", type(exc).__name__, exc)
            finally:
                await close_iterator(changes)
            self.live = []
            await asyncio.sleep(pause)
            pause = min(pause * 2, 10.0)


class Overview:
    """What the overview page shows, kept fresh by ``run`` and pushed by ``publish``."""

    def __init__(self, app: QueueTasks, queues: Sequence[str], workers: WorkerWatch,
                 interval: float = 3.0) -> None:
        self.app = app
        self.queues = list(dict.fromkeys(queues))
        self.workers = workers
        self.interval = interval
        self.latest: dict[str, Any] | None = None

    async def read(self) -> dict[str, Any]:
        """One reading; a figure the broker cannot give is null, an error is reported in
        the reading (the page says so) instead of ending the loop."""
        reading: dict[str, Any] = {"at": time.time(), "error": None}
        try:
            workers = self.workers.current()
            served = {q for w in workers for q in w.get("queues", ())}
            names = list(dict.fromkeys([*self.queues, *sorted(served)]))
            stats = await self.app.broker.inspect(names)
            for s in stats:
                serving = [w for w in workers if s.queue in w.get("queues", ())]
                if s.in_flight is None:
                    s.in_flight = sum(_in_flight(w, s.queue) for w in serving)
                if s.consumers is None:
                    s.consumers = len(serving)
            reading["queues"] = [asdict(s) for s in stats]
            reading["workers"] = workers
            try:
                reading["dead_letters"] = await self.app.broker.dead_count()
            except NotSupportedError:
                reading["dead_letters"] = None
        except Exception as exc:  # the broker is away: say so, try again next interval
            reading["error"] = f"{type(exc).__name__}: {exc}"
            log.warning("the dashboard could not read the overview: %s", reading["error"])
        self.latest = reading
        return reading

    async def run(self, watched: asyncio.Event, publish: Callable[[dict[str, Any]], None]
                  ) -> None:
        """Read and publish every ``interval`` seconds while ``watched`` is set."""
        while True:
            await watched.wait()
            publish(await self.read())
            await asyncio.sleep(self.interval)  # the polling period, not a synchronisation


def _in_flight(worker: dict[str, Any], queue: str) -> int:
    held = worker.get("in_flight_by_queue", worker.get("in_flight"))
    return int(held.get(queue, 0)) if isinstance(held, dict) else 0
