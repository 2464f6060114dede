"""What the dashboard can change, when started with ``--allow-actions``: cancel a task,
requeue or purge dead letters, submit a task. Each request must carry the dashboard's
token in the ``X-QTasks-Token`` header, compared in constant time. A header (not a
cookie) is what a page of another site cannot make a browser send, so a visited page
cannot act through an operator's open dashboard. Every action is logged with who asked.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from qtasks.dashboard.routes import dashboard_of, error, json, task_id_of
from qtasks.errors import ConfigurationError, NotSupportedError, QTasksError

log = logging.getLogger(__name__)

TOKEN_HEADER = "X-QTasks-Token"
#: A token chosen by hand must be at least this long (a generated one has 32 characters).
MIN_TOKEN = 16
#: The largest request body an action reads (a submitted task's arguments included).
MAX_BODY = 1024 * 1024


def new_token() -> str:
    """A token for a dashboard started with actions and none given: 192 random bits."""
    return secrets.token_urlsafe(24)


def check_token(token: str) -> str:
    if len(token) < MIN_TOKEN or not token.isprintable() or token != token.strip():
        raise ConfigurationError(
            f"the dashboard's token must be at least {MIN_TOKEN} printable characters "
            "without surrounding spaces (leave --token out to have one generated)")
    return token


def refusal(request: Request) -> Response | None:
    """Why this action is refused (read-only, or no valid token), or None."""
    settings = dashboard_of(request).settings
    if not settings.allow_actions or not settings.token:
        return error(403, "this dashboard is read-only: start it with --allow-actions "
                          "to cancel, requeue, purge or submit")
    given = request.headers.get(TOKEN_HEADER, "").encode()
    if not hmac.compare_digest(given, settings.token.encode()):
        client = request.client.host if request.client else "?"
        log.warning("dashboard action %s %s refused: no valid token (from %s)",
                    request.method, request.url.path, client)
        return error(401, f"this action needs the dashboard's token in the {TOKEN_HEADER} "
                          "header (printed when the dashboard started)")
    return None


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object (an empty body is ``{}``), at most ``MAX_BODY`` bytes."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ValueError(f"the request body is over {MAX_BODY} bytes")
    if not body:
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"the request body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("the request body must be a JSON object")
    return value


def _audit(request: Request, what: str) -> None:
    client = request.client.host if request.client else "?"
    log.warning("dashboard action from %s: %s", client, what)


async def submit(request: Request) -> Response:
    """``{"task": name, "args": [...], "kwargs": {...}, "queue": name}`` -> its id."""
    if (refused := refusal(request)) is not None:
        return refused
    try:
        data = await read_json(request)
        name, args, kwargs = data.get("task"), data.get("args", []), data.get("kwargs", {})
        queue = data.get("queue") or None
        if not isinstance(name, str) or not name.strip():
            raise ValueError("'task' must be a task name")
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ValueError("'args' must be a JSON array and 'kwargs' a JSON object")
        if queue is not None and not isinstance(queue, str):
            raise ValueError("'queue' must be a queue name")
        sent = await dashboard_of(request).app.send_task(name.strip(), args, kwargs,
                                                         queue=queue)
    except (ValueError, QTasksError) as exc:
        return error(400, str(exc))
    _audit(request, f"submitted {sent.name} {sent.id}")
    return json({"id": sent.id, "task": sent.name}, 201)


async def cancel(request: Request) -> Response:
    if (refused := refusal(request)) is not None:
        return refused
    task_id = task_id_of(request)
    if task_id is None:
        return error(400, "not a task id")
    try:
        reason = (await read_json(request)).get("reason", "") or "from the dashboard"
        if not isinstance(reason, str):
            raise ValueError("'reason' must be a string")
        await dashboard_of(request).app.cancel(task_id, reason[:500])
    except (ValueError, QTasksError) as exc:
        return error(400, str(exc))
    _audit(request, f"cancel {task_id}")
    return json({"id": task_id, "cancel": "sent"})


async def requeue(request: Request) -> Response:
    """``{"refs": [...]}`` requeues those dead letters; no refs, all of them."""
    if (refused := refusal(request)) is not None:
        return refused
    try:
        refs = (await read_json(request)).get("refs") or None
        if refs is not None and not (isinstance(refs, list)
                                     and all(isinstance(r, str) for r in refs)):
            raise ValueError("'refs' must be a list of dead-letter refs")
        wanted = list(dict.fromkeys(refs)) if refs else None
        moved = await dashboard_of(request).app.broker.requeue_dead(wanted)
    except NotSupportedError as exc:
        return error(501, str(exc))
    except (ValueError, QTasksError) as exc:
        return error(400, str(exc))
    _audit(request, f"requeued {len(moved)} dead letter(s)")
    missing = [r for r in wanted or () if r not in set(moved)]
    return json({"requeued": moved, "missing": missing})


async def purge(request: Request) -> Response:
    if (refused := refusal(request)) is not None:
        return refused
    try:
        purged = await dashboard_of(request).app.broker.purge_dead()
    except NotSupportedError as exc:
        return error(501, str(exc))
    _audit(request, f"purged {purged} dead letter(s)")
    return json({"purged": purged})


ROUTES = [
    Route("/api/tasks", submit, methods=["POST"]),
    Route("/api/tasks/{id:str}/cancel", cancel, methods=["POST"]),
    Route("/api/dead/requeue", requeue, methods=["POST"]),
    Route("/api/dead/purge", purge, methods=["POST"]),
]
