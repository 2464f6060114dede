"""A dashboard served for real (uvicorn on a free loopback port, in the test's loop) over
the memory backends, and a reader of its server-sent events that stops after a bounded
number of events or at a deadline."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import uvicorn

from qtasks import QueueTasks, Worker, current_task
from qtasks.dashboard import DashboardSettings, create_app
from qtasks.dashboard.board import Dashboard
from qtasks.dashboard.server import bind

TOKEN = "a-test-token-of-32-characters-xx"
DEADLINE = 20.0


def memory_app() -> QueueTasks:
    """An app on a memory broker and store of its own, with the tasks the tests run."""
    app = QueueTasks(f"memory://dash{uuid.uuid4().hex[:8]}", embedded_worker=False)

    @app.task
    async def countdown(n: int, pause: float = 0.0):  # type: ignore[no-untyped-def]
        for i in reversed(range(n)):
            yield i
            await asyncio.sleep(pause)

    @app.task
    async def echo(value: Any) -> Any:
        return value

    @app.task(retry=1, retry_backoff=0.01)
    async def flaky():  # type: ignore[no-untyped-def]
        attempt = current_task().attempt
        yield attempt
        if attempt == 1:
            raise RuntimeError("the first attempt fails")

    @app.task
    async def wait_for_cancel(seconds: float) -> None:
        await asyncio.sleep(seconds)

    return app


@dataclass
class Served:
    app: QueueTasks
    client: httpx.AsyncClient
    url: str
    board: Dashboard

    def headers(self, token: str = TOKEN) -> dict[str, str]:
        return {"X-QTasks-Token": token}


@asynccontextmanager
async def served(settings: DashboardSettings | None = None, worker: bool = True
                 ) -> AsyncIterator[Served]:
    """The dashboard of a memory app (with a worker of its own unless ``worker`` is
    false), served on a free port until the block ends."""
    app = memory_app()
    await app.start()
    run: asyncio.Task[None] | None = None
    if worker:
        running = Worker(app.runtime, concurrency=10, name="test-worker", heartbeat=0.2)
        run = asyncio.create_task(running.run())
        await running.wait_started()
    ready = asyncio.Event()
    sock = bind("127.0.0.1", 0)
    web = create_app(app, settings or DashboardSettings(), on_started=ready.set)
    server = uvicorn.Server(uvicorn.Config(web, log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        async with asyncio.timeout(DEADLINE):
            await ready.wait()
        async with httpx.AsyncClient(base_url=url, timeout=DEADLINE) as client:
            yield Served(app, client, url, web.state.dashboard)
    finally:
        server.should_exit = True
        await serving
        sock.close()
        if run is not None:
            running.stop()
            await run
        await app.close()


async def sse(client: httpx.AsyncClient, path: str, until: Callable[[str, Any], bool],
              limit: int = 500, deadline: float = DEADLINE) -> list[tuple[str, Any]]:
    """The events of the stream at ``path`` up to and including the first for which
    ``until(kind, data)`` is true; fails past ``limit`` events or ``deadline`` seconds."""
    seen: list[tuple[str, Any]] = []
    async with asyncio.timeout(deadline), client.stream("GET", path) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = "message"
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = orjson.loads(line[6:])
                seen.append((kind, data))
                if until(kind, data):
                    return seen
                assert len(seen) < limit, f"no end within {limit} events: {seen[-5:]}"
    raise AssertionError(f"the stream ended first: {seen[-5:]}")
