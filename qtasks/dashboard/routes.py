"""What the dashboard serves to read: the page, JSON for the overview, a task and the
dead letters, and the two pushed streams (the live feed, one task's events from its
first). Nothing here changes anything; the actions are in ``qtasks.dashboard.actions``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from qtasks.dashboard import sse
from qtasks.dashboard.hub import FEED_LINGER, dumps
from qtasks.errors import MessageDecodeError, NotSupportedError
from qtasks.protocol import ResultEvent, decode_task
from qtasks.registry import redact

if TYPE_CHECKING:
    from qtasks.dashboard.board import Dashboard

STATIC = Path(__file__).resolve().parent / "static"
#: A dead letter's body is shown up to this many characters.
DEAD_BODY_SHOWN = 4096
MAX_ID = 200


def json(value: Any, status: int = 200) -> Response:
    return Response(dumps(value), status_code=status, media_type="application/json")


def error(status: int, message: str) -> Response:
    return json({"error": message}, status)


def dashboard_of(request: Request) -> Dashboard:
    board: Dashboard = request.app.state.dashboard
    return board


def task_id_of(request: Request) -> str | None:
    """The ``{id}`` of the path, if it can be a task id (printable, bounded)."""
    task_id: str = request.path_params["id"]
    if not 0 < len(task_id) <= MAX_ID or not task_id.isprintable():
        return None
    return task_id


async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


async def config(request: Request) -> Response:
    board = dashboard_of(request)
    return json({"actions": board.settings.allow_actions,
                 "broker": redact(board.app.broker.url or ""),
                 "results": redact(board.app.results_store.url or ""),
                 "queues": board.overview.queues})


async def overview(request: Request) -> Response:
    """The latest reading when it is under a second old, else a new one: requests in a
    loop do not turn into a loop of broker calls."""
    board = dashboard_of(request)
    reading = board.overview.latest
    if reading is None or not reading.get("at") or time.time() - reading["at"] > 1.0:
        reading = await board.overview.read()
    return json(board.snapshot(reading))


async def tasks(request: Request) -> Response:
    """The most recently active tasks the dashboard has heard of since it started,
    newest first; ``?task=NAME`` and ``?status=STATUS`` filter them."""
    board = dashboard_of(request)
    name, status = request.query_params.get("task"), request.query_params.get("status")
    found = [t for t in board.hub.recent_tasks(board.hub.max_tasks)
             if (not name or t["task"] == name) and (not status or t["status"] == status)]
    return json(found[:_limit(request, 100)])


async def task(request: Request) -> Response:
    task_id = task_id_of(request)
    if task_id is None:
        return error(400, "not a task id")
    found = await dashboard_of(request).app.get(task_id)
    if found is None:
        return error(404, f"no task {task_id} (unknown, not started yet, or expired)")
    return json({"id": found.id, "task": found.name, "status": found.status.value,
                 "attempt": found.attempt, "worker": found.worker,
                 "created_at": found.created_at, "started_at": found.started_at,
                 "finished_at": found.finished_at, "returning": found.returning,
                 "error": found.error.to_dict() if found.error else None})


async def task_events(request: Request) -> Response:
    """Every event of one task from its first (a replay for a task under way or
    finished), then live, ending after its final: the task page's stream."""
    task_id = task_id_of(request)
    if task_id is None:
        return error(400, "not a task id")
    board = dashboard_of(request)
    handle = board.app.task_handle(task_id)

    ended = False

    def to_frame(event: ResultEvent) -> bytes:
        nonlocal ended
        ended = ended or event.kind == "final"
        return sse.frame("event", dumps(event.to_dict()))

    async def body() -> Any:
        yield sse.frame("reset", b"{}")  # a reconnected browser starts the page over
        async with sse.background(handle.events(), to_frame) as next_frame:
            async for chunk in sse.frames(next_frame, board.settings.keepalive):
                yield chunk
        if ended:  # else the read failed: the browser reconnects and reads again
            yield sse.frame("end", b"{}")

    return sse.response(body())


async def stream(request: Request) -> Response:
    """The live feed and the overview, pushed: first what the dashboard knows now
    (``hello``), then each event (``event``), each fresh overview (``overview``), a
    gap when this browser fell behind (``gap``) and a change of the subscription's
    health (``health``)."""
    board = dashboard_of(request)

    async def body() -> Any:
        with board.hub.attach() as client:
            hello = board.snapshot(board.overview.latest)
            hello["events"] = [orjson.Fragment(entry) for entry in board.hub.recent]
            yield sse.frame("hello", dumps(hello))

            async def next_frame() -> bytes:
                pushes = await client.batch(FEED_LINGER)
                return b"".join(sse.frame(kind, data) for kind, data in pushes)

            async for chunk in sse.frames(next_frame, board.settings.keepalive):
                yield chunk

    return sse.response(body())


async def dead(request: Request) -> Response:
    """The oldest dead letters with their reasons, and what their body says (a task's
    name, id and arguments when it is a task message; else the bytes as text)."""
    board = dashboard_of(request)
    try:
        letters = await board.app.broker.dead_letters(_limit(request, 100))
        count = await board.app.broker.dead_count()
    except NotSupportedError as exc:
        return error(501, str(exc))
    shown = []
    for letter in letters:
        entry: dict[str, Any] = {"ref": letter.ref, "queue": letter.queue,
                                 "reason": letter.reason, "at": letter.at,
                                 "size": len(letter.body)}
        try:
            message = decode_task(letter.body)
            entry.update(task=message.task, id=message.id, args=message.args,
                         kwargs=message.kwargs, attempt=message.attempt)
        except MessageDecodeError:
            entry.update(task=None, id=None)
        entry["body"] = letter.body[:DEAD_BODY_SHOWN].decode("utf-8", "replace")
        shown.append(entry)
    return json({"count": count, "letters": shown, "at": time.time()})


def _limit(request: Request, default: int) -> int:
    try:
        return max(1, min(1000, int(request.query_params.get("limit", default))))
    except ValueError:
        return default


ROUTES = [
    Route("/", index),
    Route("/api/config", config),
    Route("/api/overview", overview),
    Route("/api/stream", stream),
    Route("/api/tasks", tasks),
    Route("/api/tasks/{id:str}", task),
    Route("/api/tasks/{id:str}/events", task_events),
    Route("/api/dead", dead),
]
