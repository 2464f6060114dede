"""Server-sent events: the frames, a keep-alive comment while nothing happens (so that a
proxy keeps the connection open and a browser that left is noticed at the next write),
and the reading of an async iterator in the background (so that waiting for a keep-alive
never interrupts the iterator itself)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import StreamingResponse

log = logging.getLogger(__name__)

#: Seconds between keep-alive comments on a quiet stream.
KEEPALIVE = 15.0
#: What a browser waits before reconnecting a dropped stream (EventSource's ``retry``).
RETRY_MS = 2000
HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def frame(kind: str, data: bytes) -> bytes:
    """One event. ``data`` is JSON from orjson, which never holds a raw newline, so it is
    one ``data:`` line."""
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


async def frames(next_frame: Callable[[], Awaitable[bytes | None]],
                 keepalive: float = KEEPALIVE) -> AsyncIterator[bytes]:
    """The frames ``next_frame`` gives until it gives None, with a keep-alive comment
    whenever none came for ``keepalive`` seconds. ``next_frame`` must be safe to cancel
    (a queue's ``get`` is)."""
    yield f"retry: {RETRY_MS}\n\n".encode()
    while True:
        try:
            async with asyncio.timeout(keepalive):
                item = await next_frame()
        except TimeoutError:
            yield b": keep-alive\n\n"
            continue
        if item is None:
            return
        yield item


def response(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers=HEADERS)


@contextlib.asynccontextmanager
async def background(source: AsyncIterator[Any], to_frame: Callable[[Any], bytes]
                     ) -> AsyncIterator[Callable[[], Awaitable[bytes | None]]]:
    """Read ``source`` in a task of its own into a queue; yields the queue's ``get``
    (None once ``source`` has ended). On exit the task is cancelled and ``source``
    closed, whether or not it had ended: a browser that leaves ends its watch."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def read() -> None:
        try:
            async for item in source:
                queue.put_nowait(to_frame(item))
        except Exception as exc:  # the stream ends; the browser reconnects
            log.warning("a dashboard stream failed: %s: %s", type(exc).__name__, exc)
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()
            queue.put_nowait(None)

    reader = asyncio.create_task(read(), name="qtasks-dashboard-sse")
    try:
        yield queue.get
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
