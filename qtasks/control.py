"""What travels on the control channel (``Broker.broadcast``/``Broker.control``): every
worker hears every message, nothing is queued or kept.

- ``cancel`` (anyone -> workers): stop task ``id`` if it runs, and end it ``cancelled``
  if it arrives later (``QueueTasks.cancel``).
- ``ping`` (anyone -> workers): every worker that hears it answers at once with a
  ``worker`` message, so an operator learns who consumes what without a broker API for it
  (``qtasks inspect``: consumers and tasks in flight per queue, on every broker alike).
- ``worker`` (a worker -> anyone): its name, host, pid, queues, concurrency, the tasks it
  holds per queue, how many it has handled and how they ended, and its ``state``: sent in
  answer to a ping, and unasked when it starts consuming (``online``), every
  ``heartbeat`` seconds (``alive``, ``stopping`` once a graceful stop has begun) and when
  it has stopped (``offline``): what ``qtasks.workers`` keeps the live set from.

Signed like task messages when a signing key is set. Field by field in docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal, get_args

from qtasks.errors import MessageDecodeError
from qtasks.interfaces import close_iterator
from qtasks.protocol import VERSION, encode, load_body, typed_field, uuid7
from qtasks.signing import Signer

log = logging.getLogger(__name__)

#: Where a worker is in its life, as its ``worker`` messages say: ``online`` once, when it
#: starts consuming; ``alive`` on each heartbeat and ping answer; ``stopping`` from a
#: graceful stop's start until its in-flight tasks are done; ``offline`` once, its goodbye.
WorkerPhase = Literal["online", "alive", "stopping", "offline"]
_PHASES: tuple[str, ...] = get_args(WorkerPhase)


@cache
def qtasks_version() -> str:
    """The installed distribution's version, as a worker reports it ("" from a source
    tree that was never installed)."""
    try:
        return version("qtasks")
    except PackageNotFoundError:
        return ""


@dataclass(slots=True)
class ControlMessage:
    """A request broadcast to every worker: ``cancel`` task ``id``, or ``ping`` (``id``
    names the request)."""

    id: str
    kind: Literal["cancel", "ping"] = "cancel"
    ts: float = 0.0
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"v": VERSION, "kind": self.kind, "id": self.id, "ts": self.ts,
                "reason": self.reason}


@dataclass(slots=True)
class WorkerState:
    """One worker as it describes itself (``id`` is its name): in answer to a ``ping``,
    and on its own when it starts, on each heartbeat and when it stops (``state``).

    The fields after ``ts`` came with heartbeats; a reader takes their defaults from a
    message without them (a worker that only answers pings): ``heartbeat`` 0 then means
    "sends none", and ``started_at`` 0 "unknown"."""

    id: str
    queues: list[str] = field(default_factory=list)
    concurrency: int = 0
    in_flight: dict[str, int] = field(default_factory=dict)
    processed: int = 0
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    ts: float = 0.0
    kind: Literal["worker"] = "worker"
    state: WorkerPhase = "alive"
    #: Seconds between its heartbeats (0: it sends none).
    heartbeat: float = 0.0
    started_at: float = 0.0
    #: Attempts that ended: succeeded, failed for good, failed and retried, cancelled.
    done: int = 0
    failed: int = 0
    retried: int = 0
    cancelled: int = 0
    version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"v": VERSION, "kind": self.kind, "id": self.id, "queues": self.queues,
                "concurrency": self.concurrency, "in_flight": self.in_flight,
                "processed": self.processed, "host": self.host, "pid": self.pid,
                "ts": self.ts, "state": self.state, "heartbeat": self.heartbeat,
                "started_at": self.started_at, "done": self.done, "failed": self.failed,
                "retried": self.retried, "cancelled": self.cancelled,
                "version": self.version}


def decode_control(body: bytes) -> ControlMessage | WorkerState:
    """Parse a control message, with an error that says what is wrong with it."""
    data = load_body(body)
    kind = data.get("kind")
    if kind in ("cancel", "ping"):
        return ControlMessage(id=typed_field(data, "id", str), kind=kind,
                              ts=typed_field(data, "ts", float, 0.0),
                              reason=typed_field(data, "reason", str, ""))
    if kind == "worker":
        in_flight = typed_field(data, "in_flight", dict, {})
        queues = typed_field(data, "queues", list, [])
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in in_flight.values()) \
                or not all(isinstance(q, str) for q in queues):
            raise MessageDecodeError("'queues' must be strings and 'in_flight' integers")
        state = typed_field(data, "state", str, "alive")
        if state not in _PHASES:
            raise MessageDecodeError(f"'state' must be one of {', '.join(_PHASES)}, "
                                     f"not {state!r:.40}")
        counts = {name: typed_field(data, name, int, 0)
                  for name in ("processed", "done", "failed", "retried", "cancelled")}
        heartbeat = typed_field(data, "heartbeat", float, 0.0)
        if not 0 <= heartbeat < float("inf"):
            raise MessageDecodeError(f"'heartbeat' must be 0 or more seconds, not {heartbeat}")
        return WorkerState(id=typed_field(data, "id", str), queues=queues,
                           concurrency=typed_field(data, "concurrency", int, 0),
                           in_flight=in_flight,
                           host=typed_field(data, "host", str, ""),
                           pid=typed_field(data, "pid", int, 0),
                           ts=typed_field(data, "ts", float, 0.0), state=state,
                           heartbeat=heartbeat,
                           started_at=typed_field(data, "started_at", float, 0.0),
                           version=typed_field(data, "version", str, ""), **counts)
    raise MessageDecodeError(f"unknown control kind {kind!r}")


async def follow_control(control: AsyncIterator[bytes], signer: Signer | None,
                         on_cancel: Callable[[str, str], None],
                         on_ping: Callable[[], Awaitable[None]]) -> None:
    """A worker's side of the channel: cancel requests and pings, each verified when a
    signing key is set; what cannot be read is logged and skipped, never fatal."""
    try:
        async for body in control:
            try:
                message = decode_control(body)  # a signed one reads as well
            except MessageDecodeError as exc:
                log.error("ignoring an undecodable control message: %s", exc)
                continue
            if isinstance(message, WorkerState):
                # Another worker's heartbeat or answer to a ping: not for workers, signed
                # or not (a worker with a key would otherwise log a stranger's every beat).
                continue
            if signer is not None and (refused := signer.verify(body)):
                log.error("ignoring a control message: %s", refused)
                continue
            if message.kind == "cancel":
                on_cancel(message.id, message.reason)
            else:
                await on_ping()
    finally:
        await close_iterator(control)


async def ping_workers(broadcast: Callable[[bytes], Awaitable[None]],
                       control: AsyncIterator[bytes], seal: Callable[[bytes], bytes],
                       wait: float) -> list[WorkerState]:
    """Ask every worker connected now to describe itself; their answers within ``wait``
    seconds, one per worker (subscribed before asking, so no answer is missed)."""
    found: dict[str, WorkerState] = {}
    await broadcast(seal(encode(ControlMessage(id=uuid7(), kind="ping", ts=time.time()))))
    try:
        async with asyncio.timeout(wait):
            async for body in control:
                try:
                    message = decode_control(body)  # a signed one reads as well
                except MessageDecodeError:
                    continue
                if isinstance(message, WorkerState):
                    found[message.id] = message  # an answer, or a heartbeat meanwhile
                    if message.state == "offline":
                        del found[message.id]  # its goodbye came within the wait
    except TimeoutError:
        pass  # the answers of every worker that heard the ping are in by now
    finally:
        await close_iterator(control)
    return sorted(found.values(), key=lambda state: state.id)
