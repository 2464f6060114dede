"""The ``qtasks`` command: ``worker`` runs a worker process, ``demo`` shows streaming, and
``send``/``listen``/``status``/``cancel``/``inspect``/``workers``/``dead`` operate a deployment
from a shell (``qtasks.operator``, ``qtasks.workers_command``). The parser and the checks of
its values live in ``qtasks.cli_args``; what each command prints is documented in ``docs/cli.md``.

A user's mistake (a flag, an environment variable, an unreachable broker, refused
credentials, a wait that ran out) ends in one line on stderr and an exit status, never a
traceback: the traceback is for QTasks' own bugs.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from qtasks.app import QueueTasks
from qtasks.cli_args import build_parser, resolve
from qtasks.errors import ConfigurationError, QTasksError, TaskTimeoutError
from qtasks.log_output import TurnBufferedHandler
from qtasks.operator import Operator, ask_on_terminal, connect
from qtasks.registry import redact
from qtasks.workers_command import show_workers, watch_workers

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The broker client libraries log every failed connection attempt (aiormq at ERROR,
#: nats-py through its callbacks); the CLI says what went wrong in one line instead.
CLIENT_LOGGERS = ("aiormq", "aio_pika", "nats")

#: What the backends say when the server refused the credentials: RabbitMQ's
#: ACCESS_REFUSED, NATS's "Authorization Violation", or their own wording of it.
_REFUSED = re.compile(r"refused the credentials|ACCESS_REFUSED|authori[sz]ation violation|"
                      r"authentication failed", re.IGNORECASE)


def explain(exc: BaseException) -> str:
    """The one line for an error; a refusal of the credentials says so first, whatever
    words the backend used."""
    text = str(exc) or type(exc).__name__
    if _REFUSED.search(text) and not text.startswith("authentication failed"):
        text = f"authentication failed: {text}"
    return text


def load_app(spec: str) -> QueueTasks:
    """``package.module:attribute`` (attribute defaults to ``app``) to the app object."""
    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except (ImportError, ValueError, TypeError) as exc:  # ValueError: an empty name
        raise ConfigurationError(f"cannot import {module_name!r} (from {spec!r}, "
                                 f"module:attribute): {exc}") from None
    app = getattr(module, attribute or "app", None)
    if not isinstance(app, QueueTasks):
        found = "nothing" if app is None else type(app).__name__
        raise ConfigurationError(f"{spec!r} is not a QueueTasks instance (found {found})")
    return app


def setup_logging(level: int, quiet: bool = False) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[TurnBufferedHandler()])
    if level > logging.DEBUG:
        for name in CLIENT_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if quiet:  # the worker's one line per finished task (qtasks.running)
        logging.getLogger("qtasks.worker.tasks").setLevel(logging.WARNING)


def with_connect_timeout(url: str, seconds: float) -> str:
    """``url`` with a ``connect_timeout`` query option (the last URL of a list carries
    it: the backends read the options of every part)."""
    return f"{url}{'&' if '?' in url.rsplit(',', 1)[-1] else '?'}connect_timeout={seconds:g}"


def _same_place(given: str, used: object) -> bool:
    """Whether the app's backend is at the URL given (scheme, host, port, path: the
    backends may show their URL normalised or redacted)."""
    if not isinstance(used, str):
        return False

    def place(url: str) -> tuple[str, str | None, int | None, str]:
        parts = urlsplit(redact(url).split(",")[0].strip())
        return parts.scheme, parts.hostname, parts.port, parts.path.strip("/")

    try:
        return place(given) == place(used)
    except ValueError:  # a port that is not a number: the backend said so already
        return False


def prepare_worker(args: argparse.Namespace) -> QueueTasks:
    """Load the app with ``--broker``/``--results`` applied, or refuse to start.

    The flags reach the app through the environment: ``QueueTasks()`` without URLs reads
    ``QTASKS_BROKER_URL``/``QTASKS_RESULTS_URL`` when the app module builds it, so they
    are set before that module is imported. An app built with other URLs is refused,
    not silently kept. So is ``memory://``: nothing outside this process can reach it."""
    flags = {"QTASKS_BROKER_URL": args.broker, "QTASKS_RESULTS_URL": args.results}
    for env, url in flags.items():
        if url:
            os.environ[env] = url
        if args.connect_timeout is not None and os.environ.get(env):
            os.environ[env] = with_connect_timeout(os.environ[env], args.connect_timeout)
    app = load_app(args.app)
    if app.broker.embedded:
        raise ConfigurationError(
            f"the broker of {args.app} is memory:// (in-process): no other process can "
            "reach it, so this worker would never get a task; give it a broker with "
            "--broker URL or QTASKS_BROKER_URL (amqp://... or nats://...)")
    used = {"QTASKS_BROKER_URL": (app.broker, "--broker"),
            "QTASKS_RESULTS_URL": (app.results_store, "--results")}
    for env, url in flags.items():
        backend, flag = used[env]
        if url and not _same_place(url, getattr(backend, "url", None)):
            where = redact(str(getattr(backend, "url", type(backend).__name__)))
            raise ConfigurationError(
                f"{flag} {redact(url)} was given, but {args.app} was built with {where}: "
                f"build it as QueueTasks() (it then reads {env}, which {flag} sets) or "
                f"leave out {flag}")
    return app


def serve_metrics(app: QueueTasks, port: int, host: str) -> Callable[[], None]:
    """``--metrics-port``: add a PrometheusMiddleware to the app's chain (or use the one it
    has) and serve it; returns what stops the server. Only here is prometheus_client
    imported, so a worker without the flag never loads it."""
    try:
        from qtasks.metrics import PrometheusMiddleware
    except ImportError as exc:
        raise ConfigurationError(f"--metrics-port: {exc}") from None
    chain = app.runtime.middleware
    found = [m for m in chain.middleware if isinstance(m, PrometheusMiddleware)]
    metrics = found[0] if found else PrometheusMiddleware()
    if not found:
        chain.add(metrics)
    return metrics.serve(port, host).close


async def run_worker(app: QueueTasks, args: argparse.Namespace) -> None:
    from qtasks.beat_command import alongside, beat_for
    from qtasks.worker import Worker

    beat = beat_for(app, args)  # refused before connecting: no schedule, say
    where = " / ".join(dict.fromkeys(
        redact(str(getattr(b, "url", type(b).__name__)))
        for b in (app.broker, app.results_store)))
    stop_metrics = (serve_metrics(app, args.metrics_port, args.metrics_host)
                    if getattr(args, "metrics_port", None) is not None else None)
    try:
        backstop = args.connect_timeout + 5 if args.connect_timeout is not None else None
        await connect(app, backstop, where)
        if args.log_level > logging.DEBUG:
            # Connected: from now on a client library's warnings (a lost connection,
            # say) are worth a line in a long-running worker's log.
            for name in CLIENT_LOGGERS:
                logging.getLogger(name).setLevel(logging.WARNING)
        worker = Worker(app, queues=args.queues, concurrency=args.concurrency,
                        grace=args.grace, heartbeat=args.heartbeat)
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                log.warning("%s: finishing in-flight tasks (up to %.0f s); again to stop now",
                            signal.Signals(signum).name, worker.grace)
            else:
                worker.grace = 0
            worker.stop()
            if beat is not None:
                beat.stop()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        await alongside(worker.run(), beat, worker.stop)
    finally:
        await app.close()
        if stop_metrics is not None:
            stop_metrics()


async def run_operator(args: argparse.Namespace) -> int:
    if not args.broker:
        raise ConfigurationError("no broker: pass --broker URL or set QTASKS_BROKER_URL")
    if args.command == "dead" and args.action == "purge" and not args.yes \
            and not sys.stdin.isatty():
        # Before connecting: nothing to wait for when the answer is already no.
        ask_on_terminal("purge every dead letter")
    async with Operator(args.broker, args.results, args.connect_timeout) as op:
        if args.command == "send":
            return await op.send(args.task, args.args, args.kwargs, queue=args.queue,
                                 priority=args.priority, delay=args.delay, wait=args.wait,
                                 stream=args.stream, timeout=args.timeout, as_json=args.json)
        if args.command == "listen":
            return await op.listen(args.task, args.json, args.limit)
        if args.command == "status":
            return await op.status(args.id, args.json, args.idle)
        if args.command == "cancel":
            return await op.cancel(args.id, args.reason, args.wait, args.timeout, args.json)
        if args.command == "inspect":
            queues = [q.strip() for q in args.queues.split(",") if q.strip()]
            return await op.inspect(queues, args.json)
        if args.command == "workers":
            if args.watch:
                return await watch_workers(op.app, args.json, args.limit)
            return await show_workers(op.app, args.json, args.wait)
        return await op.dead(args.action, args.refs, args.limit, args.json, args.yes)


async def run_dashboard(args: argparse.Namespace) -> None:
    """``qtasks dashboard``: the app from ``module:app`` (with ``--broker``/``--results``
    applied as for a worker) or from the URLs alone, then the server of the extra."""
    try:
        from qtasks.dashboard import server
    except ImportError as exc:
        raise ConfigurationError(f"the dashboard needs its extra: pip install "
                                 f"'qtasks[dashboard]' ({exc})") from None
    if args.app:
        app = prepare_worker(args)
        queues = app.queues()
    elif args.broker:
        timeout = 10.0 if args.connect_timeout is None else args.connect_timeout
        app = Operator(args.broker, args.results, timeout).app
        queues = ["default"]
    else:
        raise ConfigurationError("no broker: give module:app, pass --broker URL or set "
                                 "QTASKS_BROKER_URL")
    if args.queues:
        queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    settings = server.settings_of(args.host, args.allow_actions, args.token, queues)
    # Without the flag, an app's backends keep their own deadline (and its error).
    timeout = args.connect_timeout if args.app or args.connect_timeout is not None else 10.0
    await server.run_dashboard(app, args.host, args.port, settings, timeout)


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when it is installed (the ``uvloop`` extra) and not
    disabled with ``QTASKS_UVLOOP=0``: a faster loop for the same code."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if os.environ.get("QTASKS_UVLOOP", "1") != "0":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # a usage error exits 2 with argparse's line
    try:
        args = resolve(args)
        setup_logging(args.log_level, quiet=getattr(args, "quiet", False))
        if args.command == "worker":
            run(run_worker(prepare_worker(args), args))
            return 0
        if args.command == "dashboard":
            run(run_dashboard(args))
            return 0
        if args.command == "beat":
            from qtasks.beat_command import run_beat

            run(run_beat(prepare_worker(args), args))
            return 0
        if args.command == "demo":
            from qtasks.demo import run_demo

            run(run_demo(args.url, args.n, args.delay))
            return 0
        return run(run_operator(args))
    except TaskTimeoutError as exc:
        print(f"qtasks: {exc}", file=sys.stderr)
        return 3
    except (QTasksError, NotImplementedError) as exc:
        print(f"qtasks: {explain(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
