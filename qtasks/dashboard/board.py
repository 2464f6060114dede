"""The dashboard's state, shared by its routes: the app, the settings, the one
subscription (``EventHub``), the live workers and the overview's readings."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qtasks.app import QueueTasks
from qtasks.dashboard.hub import EventHub, dumps
from qtasks.dashboard.overview import Overview, WorkerWatch

#: Host names a dashboard bound to loopback answers to.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass
class DashboardSettings:
    """How a dashboard behaves (``qtasks dashboard`` fills it from its flags)."""

    #: Cancel, requeue, purge and submit are possible, each with ``token``.
    allow_actions: bool = False
    token: str | None = None
    #: Queues the overview shows besides those the live workers consume.
    queues: Sequence[str] = ("default",)
    #: ``Host`` header values answered; None: any.
    allowed_hosts: Sequence[str] | None = None
    #: Seconds between two readings of the overview while a browser watches.
    overview_interval: float = 3.0
    #: Seconds between keep-alive comments on a quiet stream.
    keepalive: float = 15.0


class Dashboard:
    """What the routes share: the app, the settings, the hub and the overview."""

    def __init__(self, app: QueueTasks, settings: DashboardSettings) -> None:
        self.app = app
        self.settings = settings
        self.hub = EventHub(lambda: app.subscribe("*"))
        self.workers = WorkerWatch(app, self.publish_workers)
        self.overview = Overview(app, settings.queues, self.workers,
                                 settings.overview_interval)
        self._running: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.hub.start()
        self._running = [
            asyncio.create_task(self.workers.run(), name="qtasks-dashboard-workers"),
            asyncio.create_task(self.overview.run(self.hub.watched, self.publish_overview),
                                name="qtasks-dashboard-overview")]

    async def close(self) -> None:
        for task in self._running:
            task.cancel()
        for task in self._running:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._running = []
        await self.hub.close()

    def snapshot(self, reading: dict[str, Any] | None) -> dict[str, Any]:
        """The overview as pushed and served: the latest reading, the chart's rates and
        the subscription's health."""
        now = time.time()
        return {**(reading or {"at": None, "error": None}),
                "rates": self.hub.rates.series(now),
                "listening": self.hub.error is None, "listen_error": self.hub.error,
                "received": self.hub.received, "actions": self.settings.allow_actions}

    def publish_overview(self, reading: dict[str, Any]) -> None:
        self.hub.send("overview", dumps(self.snapshot(reading)))

    def publish_workers(self, change: str, worker: dict[str, Any]) -> None:
        """A worker joined, left or was lost: pushed at once, with the whole live set."""
        self.hub.send("workers", dumps({"change": change, "worker": worker,
                                        "workers": self.workers.current()}))
