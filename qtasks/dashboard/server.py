"""``qtasks dashboard``: connect, bind, print where the dashboard is, serve until a
signal.

The socket is bound here, before uvicorn starts, so that a port in use is one line
(exit 2) and ``--port 0`` works (the line says which port it got; tests read it). The
first line on stdout is ``dashboard at http://HOST:PORT/`` and, with actions on, the
token and a link that carries it in the URL's fragment (never sent to the server, so not
in any log); it comes once the subscription is active.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import sys

import uvicorn

from qtasks.app import QueueTasks
from qtasks.dashboard.actions import check_token, new_token
from qtasks.dashboard.app import create_app
from qtasks.dashboard.board import LOOPBACK_HOSTS, DashboardSettings
from qtasks.errors import ConfigurationError
from qtasks.operator import connect
from qtasks.registry import redact

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or a ``ConfigurationError`` saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, IndexError) as exc:
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                                 ) from None
    sock.setblocking(False)
    return sock


def settings_of(host: str, allow_actions: bool, token: str | None,
                queues: list[str]) -> DashboardSettings:
    """The settings from the command's flags: a token is checked, or made when actions
    are on; refused when they are off (a token that protects nothing is a mistake)."""
    if token and not allow_actions:
        raise ConfigurationError("--token (or QTASKS_DASHBOARD_TOKEN) is for actions: add "
                                 "--allow-actions, or leave the token out")
    if allow_actions:
        token = check_token(token) if token else new_token()
    return DashboardSettings(
        allow_actions=allow_actions, token=token if allow_actions else None, queues=queues,
        allowed_hosts=[*LOOPBACK_HOSTS, host] if is_loopback(host) else None)


async def run_dashboard(app: QueueTasks, host: str, port: int, settings: DashboardSettings,
                        connect_timeout: float | None) -> None:
    """Serve the dashboard of ``app`` on ``host:port`` until SIGINT or SIGTERM, then
    close the app and return."""
    where = " / ".join(dict.fromkeys(
        redact(str(b.url or type(b).__name__)) for b in (app.broker, app.results_store)))
    sock = bind(host, port)
    try:
        await connect(app, None if connect_timeout is None else connect_timeout + 5, where)
        bound_host, bound_port = sock.getsockname()[:2]
        url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}/"
        announce = _announcement(url, settings, where)
        config = uvicorn.Config(create_app(app, settings, lambda: print(announce, flush=True)),
                                log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=3)
        server = uvicorn.Server(config)
        # uvicorn re-raises the signal that stopped it once it has shut down; these
        # handlers take it, so that the app is closed and the command exits 0.
        stopped: list[int] = []
        previous = {signum: signal.signal(signum, lambda signum, _: stopped.append(signum))
                    for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            await server.serve(sockets=[sock])
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if not server.started:
            raise ConfigurationError(f"the dashboard did not start on {url} (see above)")
    finally:
        sock.close()
        await app.close()


def _announcement(url: str, settings: DashboardSettings, where: str) -> str:
    lines = [f"dashboard at {url} ({where})"]
    if settings.allow_actions:
        lines.append(f"actions on: token {settings.token} (header X-QTasks-Token); "
                     f"open {url}#token={settings.token}")
    else:
        lines.append("read-only (start with --allow-actions to cancel, requeue, purge or "
                     "submit)")
    if not is_loopback(url.split("//", 1)[1].rsplit(":", 1)[0]):
        print("qtasks: the dashboard listens beyond this machine: anyone who can reach "
              "it sees every task's arguments and results", file=sys.stderr, flush=True)
    return "\n".join(lines)
