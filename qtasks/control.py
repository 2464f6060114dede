"""What travels on the control channel (``Broker.broadcast``/``Broker.control``): every
worker hears every message, nothing is queued or kept.

- ``cancel`` (anyone -> workers): stop task ``id`` if it runs, and end it ``cancelled``
  if it arrives later (``QueueTasks.cancel``).
- ``ping`` (anyone -> workers): every worker that hears it answers at once with a
  ``worker`` message, so an operator learns who consumes what without a broker API for it
  (``qtasks inspect``: consumers and tasks in flight per queue, on every broker alike).
- ``worker`` (a worker -> anyone): its name, host, pid, queues, concurrency, the tasks it
  holds per queue and how many it has handled.

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
from typing import Any, Literal

from qtasks.errors import MessageDecodeError
from qtasks.interfaces import close_iterator
from qtasks.protocol import VERSION, encode, load_body, typed_field, uuid7
from qtasks.signing import Signer

log = logging.getLogger(__name__)


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
    """One worker as it describes itself in answer to a ``ping`` (``id`` is its name)."""

    id: str
    queues: list[str] = field(default_factory=list)
    concurrency: int = 0
    in_flight: dict[str, int] = field(default_factory=dict)
    processed: int = 0
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    ts: float = 0.0
    kind: Literal["worker"] = "worker"

    def to_dict(self) -> dict[str, Any]:
        return {"v": VERSION, "kind": self.kind, "id": self.id, "queues": self.queues,
                "concurrency": self.concurrency, "in_flight": self.in_flight,
                "processed": self.processed, "host": self.host, "pid": self.pid,
                "ts": self.ts}


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
        return WorkerState(id=typed_field(data, "id", str), queues=queues,
                           concurrency=typed_field(data, "concurrency", int, 0),
                           in_flight=in_flight,
                           processed=typed_field(data, "processed", int, 0),
                           host=typed_field(data, "host", str, ""),
                           pid=typed_field(data, "pid", int, 0),
                           ts=typed_field(data, "ts", float, 0.0))
    raise MessageDecodeError(f"unknown control kind {kind!r}")


async def follow_control(control: AsyncIterator[bytes], signer: Signer | None,
                         on_cancel: Callable[[str, str], None],
                         on_ping: Callable[[], Awaitable[None]]) -> None:
    """A worker's side of the channel: cancel requests and pings, each verified when a
    signing key is set; what cannot be read is logged and skipped, never fatal."""
    try:
        async for body in control:
            if signer is not None and (refused := signer.verify(body)):
                log.error("ignoring a control message: %s", refused)
                continue
            try:
                message = decode_control(body)
            except MessageDecodeError as exc:
                log.error("ignoring an undecodable control message: %s", exc)
                continue
            if isinstance(message, WorkerState):
                continue  # another worker's answer to a ping
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
                    found[message.id] = message
    except TimeoutError:
        pass  # the answers of every worker that heard the ping are in by now
    finally:
        await close_iterator(control)
    return sorted(found.values(), key=lambda state: state.id)
