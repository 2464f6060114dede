"""``qtasks beat module:app`` and ``qtasks worker module:app --beat``: the periodic
scheduler (``qtasks.beat``) as a process of its own or beside a worker.

Start as many as you like: one leads, the others stand by and take over when it dies
(``docs/periodic.md``). A first SIGTERM or SIGINT hands the lead over and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from typing import Any

from qtasks.app import QueueTasks
from qtasks.beat import Beat
from qtasks.operator import connect
from qtasks.registry import redact

log = logging.getLogger(__name__)


def beat_for(app: QueueTasks, args: argparse.Namespace) -> Beat | None:
    """The beat ``qtasks worker --beat`` runs beside the worker (None without ``--beat``);
    refused now, before connecting, when the app declares no periodic task."""
    if not getattr(args, "beat", False):
        return None
    return Beat(app, group=args.beat_group, ttl=args.lock_ttl)


async def alongside(work: Coroutine[Any, Any, None], beat: Beat | None,
                    stop_work: Any) -> None:
    """Run ``work`` (the worker) and ``beat`` together: when the worker ends, the beat
    stops (handing the lead over); when the beat fails (a broker that cannot elect), the
    worker is stopped and the error raised."""
    if beat is None:
        await work
        return
    beating = asyncio.create_task(beat.run(), name="qtasks-beat")
    working = asyncio.create_task(work, name="qtasks-worker")
    await asyncio.wait({beating, working}, return_when=asyncio.FIRST_COMPLETED)
    if beating.done() and beating.exception() is not None:
        stop_work()
    beat.stop()
    try:
        await working
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await beating
        if beating.done() and not beating.cancelled() and beating.exception() is not None:
            raise beating.exception()  # type: ignore[misc]


async def run_beat(app: QueueTasks, args: argparse.Namespace) -> None:
    """``qtasks beat``: connect, then lead or stand by until a signal."""
    where = redact(str(getattr(app.broker, "url", "") or type(app.broker).__name__))
    beat = Beat(app, group=args.group, ttl=args.lock_ttl)
    try:
        backstop = args.connect_timeout + 5 if args.connect_timeout is not None else None
        await connect(app, backstop, where)
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            log.warning("%s: handing the lead over and stopping", signal.Signals(signum).name)
            beat.stop()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        await beat.run()
    finally:
        await app.close()
