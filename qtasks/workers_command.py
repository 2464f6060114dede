"""``qtasks workers``: the live workers as a table, or one JSON object per worker; with
``--watch``, one line per change of the live set until interrupted (shapes in
docs/cli.md). The live set itself is ``qtasks.workers``'s."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import orjson

from qtasks.app import QueueTasks
from qtasks.interfaces import close_iterator
from qtasks.workers import LiveWorker, WorkersChange

_COLUMNS = (f"{'worker':<32} {'host':<16} {'pid':>7} {'queues':<16} {'in flight':>9} "
            f"{'done':>7} {'failed':>7} {'uptime':>9} {'seen':>6}")


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def duration(seconds: float | None) -> str:
    """``42s``, ``3m07s``, ``2h05m``, ``3d04h``: an uptime at a glance ("-": unknown)."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def row(worker: LiveWorker, now: float) -> str:
    return (f"{worker.name:<32} {worker.host:<16} {worker.pid:>7} "
            f"{','.join(worker.queues):<16} "
            f"{f'{worker.in_flight}/{worker.concurrency}':>9} {worker.done:>7} "
            f"{worker.failed:>7} {duration(worker.uptime(now)):>9} "
            f"{f'{max(0.0, now - worker.last_seen):.1f}s':>6}")


def describe_change(change: WorkersChange, now: float) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    worker = change.worker
    if change.event in ("left", "lost"):
        how = "said goodbye" if change.event == "left" else \
            f"missed 3 heartbeats (last seen {now - worker.last_seen:.1f}s ago)"
        return f"{stamp} {change.event:<7} {worker.name}: {how}; {len(change.workers)} live"
    return (f"{stamp} {change.event:<7} {worker.name} ({worker.state}): "
            f"{worker.in_flight}/{worker.concurrency} in flight, {worker.done} done, "
            f"{worker.failed} failed; {len(change.workers)} live")


async def show_workers(app: QueueTasks, as_json: bool, wait: float,
                       out: TextIO = sys.stdout) -> int:
    """The live workers once: those that answer a ping within ``wait`` seconds."""
    workers = await app.workers(wait)
    now = time.time()
    if as_json:
        for worker in workers:
            print(_json(worker.to_dict(now)), file=out, flush=True)
        return 0
    print(_COLUMNS, file=out)
    for worker in workers:
        print(row(worker, now), file=out)
    print(f"{len(workers)} worker(s)", file=out, flush=True)
    return 0


async def watch_workers(app: QueueTasks, as_json: bool, limit: int | None = None,
                        out: TextIO = sys.stdout) -> int:
    """Each change of the live set as it happens, until interrupted (or ``limit``)."""
    changes = app.watch_workers()
    print("watching workers (Ctrl-C to stop)", file=sys.stderr, flush=True)
    seen = 0
    try:
        async for change in changes:
            now = time.time()
            print(_json({"event": change.event, "worker": change.worker.to_dict(now),
                         "live": len(change.workers)}) if as_json
                  else describe_change(change, now), file=out, flush=True)
            seen += 1
            if limit is not None and seen >= limit:
                break
    finally:
        await close_iterator(changes)
    return 0
