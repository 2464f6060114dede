"""The dashboard as an ASGI application: ``create_app(queue_tasks, settings)``.

The application's lifespan starts the one subscription (``EventHub``) and the overview's
polling, and stops them; the ``QueueTasks`` app must be connected by then (``qtasks
dashboard`` connects it first, so that an unreachable broker is one line, not a server
that starts and fails). Every response carries a Content-Security-Policy that allows the
page's own script only: even a value that slipped past the page's escaping could not
run. With ``allowed_hosts`` set (loopback names when bound to loopback), a request whose
``Host`` is another name is refused: a web page cannot reach the dashboard by DNS
rebinding.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qtasks.app import QueueTasks
from qtasks.dashboard import actions, routes
from qtasks.dashboard.board import Dashboard, DashboardSettings

SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
     b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class SecurityHeaders:
    """Adds ``SECURITY_HEADERS`` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(queue_tasks: QueueTasks, settings: DashboardSettings | None = None,
               on_started: Callable[[], None] | None = None) -> Starlette:
    """The dashboard of ``queue_tasks`` (connected before the lifespan starts);
    ``on_started`` is called once its subscription is active."""
    settings = settings or DashboardSettings()
    board = Dashboard(queue_tasks, settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await board.start()
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            await board.close()

    middleware = [Middleware(SecurityHeaders)]
    if settings.allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware,
                                     allowed_hosts=list(settings.allowed_hosts)))
    app = Starlette(
        routes=[*routes.ROUTES, *actions.ROUTES,
                Mount("/static", StaticFiles(directory=routes.STATIC), name="static")],
        middleware=middleware, lifespan=lifespan)
    app.state.dashboard = board
    return app
