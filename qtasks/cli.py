"""The ``qtasks`` command: ``worker`` runs a worker process, ``demo`` shows streaming."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from qtasks.app import QueueTasks
from qtasks.errors import ConfigurationError

log = logging.getLogger("qtasks.cli")


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "worker":
            app = load_app(args.app)
            queues = [q.strip() for q in args.queues.split(",")] if args.queues else None
            asyncio.run(run_worker(app, queues, args.concurrency, args.grace))
        elif args.command == "demo":
            from qtasks.demo import run_demo

            asyncio.run(run_demo(args.url, args.n, args.delay))
    except ConfigurationError as exc:
        print(f"qtasks: {exc}", file=sys.stderr)
        return 2
    return 0
