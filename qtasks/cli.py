"""The ``qtasks`` command: ``worker`` runs a worker process, ``demo`` shows streaming, and
``send``/``listen``/``status``/``cancel``/``inspect``/``dead`` operate a deployment from a
shell."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import orjson

from qtasks.app import QueueTasks
from qtasks.errors import ConfigurationError, QTasksError

log = logging.getLogger("qtasks.cli")
T = TypeVar("T")


def load_app(spec: str) -> QueueTasks:
    """``package.module:attribute`` (attribute defaults to ``app``) to the app object."""
    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
    app = getattr(module, attribute or "app", None)
    if not isinstance(app, QueueTasks):
        raise ConfigurationError(f"{spec!r} is not a QueueTasks instance")
    return app


async def run_worker(app: QueueTasks, queues: list[str] | None, concurrency: int,
                     grace: float) -> None:
    from qtasks.worker import Worker

    worker = Worker(app, queues=queues, concurrency=concurrency, grace=grace)
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.warning("%s: finishing in-flight tasks (up to %.0f s); again to stop now",
                        signal.Signals(signum).name, grace)
            worker.stop()
        else:
            worker.grace = 0
            worker.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await worker.run()
    finally:
        await app.close()


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=os.environ.get("QTASKS_LOG_LEVEL", "INFO"))
    parser = argparse.ArgumentParser(prog="qtasks", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="run a worker for an app", parents=[common])
    worker.add_argument("app", help="module:attribute of the QueueTasks app")
    worker.add_argument("--concurrency", "-c", type=int,
                        default=int(os.environ.get("QTASKS_CONCURRENCY", "100")))
    worker.add_argument("--queues", "-q", default=os.environ.get("QTASKS_QUEUES"),
                        help="comma-separated queues (default: every queue of the app)")
    worker.add_argument("--grace", type=float,
                        default=float(os.environ.get("QTASKS_GRACE", "30")),
                        help="seconds in-flight tasks may take to finish on SIGTERM")

    demo = commands.add_parser("demo", help="stream the seed's generator task",
                                 parents=[common])
    demo.add_argument("--url", default=None, help="broker URL (default: memory://)")
    demo.add_argument("-n", type=int, default=5)
    demo.add_argument("--delay", type=float, default=0.2)

    remote = argparse.ArgumentParser(add_help=False, parents=[common])
    remote.add_argument("--broker", default=os.environ.get("QTASKS_BROKER_URL"),
                        help="broker URL (default: $QTASKS_BROKER_URL)")
    remote.add_argument("--results", default=os.environ.get("QTASKS_RESULTS_URL"),
                        help="result store URL (default: $QTASKS_RESULTS_URL, else the broker)")
    remote.add_argument("--connect-timeout", type=float, default=10.0)
    remote.add_argument("--json", action="store_true", help="one JSON object per line")

    send = commands.add_parser("send", parents=[remote], help="enqueue a task by name")
    send.add_argument("task")
    send.add_argument("--args", type=_json_list, default=[], help="JSON array of arguments")
    send.add_argument("--kwargs", type=_json_object, default={}, help="JSON object")
    send.add_argument("--queue")
    send.add_argument("--priority", type=int)
    send.add_argument("--delay", type=float)
    send.add_argument("--wait", action="store_true", help="wait for the final result")
    send.add_argument("--stream", action="store_true", help="print partials as they arrive")
    send.add_argument("--timeout", type=float, default=None)

    listen = commands.add_parser("listen", parents=[remote],
                                 help="print live events of a task name ('*': all)")
    listen.add_argument("task")
    listen.add_argument("--limit", type=int, default=None, help="stop after N events")

    status = commands.add_parser("status", parents=[remote], help="one task's state")
    status.add_argument("id")

    cancel = commands.add_parser("cancel", parents=[remote],
                                 help="ask the workers to cancel a task")
    cancel.add_argument("id")
    cancel.add_argument("--reason", default="", help="recorded in the task's error")
    cancel.add_argument("--wait", action="store_true",
                        help="wait until the task has ended and print how")
    cancel.add_argument("--timeout", type=float, default=None)

    inspect_ = commands.add_parser("inspect", parents=[remote], help="queue depths")
    inspect_.add_argument("--queues", default="default", help="comma-separated")

    dead = commands.add_parser("dead", parents=[remote], help="dead letters")
    dead.add_argument("action", choices=["list", "requeue", "purge"])
    dead.add_argument("refs", nargs="*", help="requeue only these (default: all)")
    dead.add_argument("--limit", type=int, default=100)
    return parser


def _json_list(text: str) -> list[object]:
    value = orjson.loads(text)
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError("expected a JSON array, e.g. '[1, 2]'")
    return value


def _json_object(text: str) -> dict[str, object]:
    value = orjson.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object, e.g. \'{"a": 1}\'')
    return value


async def run_operator(args: argparse.Namespace) -> int:
    from qtasks.operator import Operator

    if not args.broker:
        raise ConfigurationError("no broker: pass --broker URL or set QTASKS_BROKER_URL")
    async with Operator(args.broker, args.results, args.connect_timeout) as op:
        if args.command == "send":
            return await op.send(args.task, args.args, args.kwargs, queue=args.queue,
                                 priority=args.priority, delay=args.delay, wait=args.wait,
                                 stream=args.stream, timeout=args.timeout, as_json=args.json)
        if args.command == "listen":
            return await op.listen(args.task, args.json, args.limit)
        if args.command == "status":
            return await op.status(args.id, args.json)
        if args.command == "cancel":
            return await op.cancel(args.id, args.reason, args.wait, args.timeout, args.json)
        if args.command == "inspect":
            return await op.inspect(args.queues.split(","), args.json)
        return await op.dead(args.action, args.refs, args.limit, args.json)


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
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "worker":
            app = load_app(args.app)
            queues = [q.strip() for q in args.queues.split(",")] if args.queues else None
            run(run_worker(app, queues, args.concurrency, args.grace))
            return 0
        if args.command == "demo":
            from qtasks.demo import run_demo

            run(run_demo(args.url, args.n, args.delay))
            return 0
        return run(run_operator(args))
    except (QTasksError, NotImplementedError) as exc:
        print(f"qtasks: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
