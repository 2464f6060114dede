"""The ``qtasks`` command line: its parser, and the checks that turn a user's mistake in a
flag or an environment variable into one line naming it, never a traceback.

Environment defaults (``QTASKS_CONCURRENCY`` ...) are read after parsing, not while the
parser is built: a bad value then says which variable holds it, and ``--help`` works
whatever the environment holds.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import TypeVar

import orjson

from qtasks.errors import ConfigurationError

T = TypeVar("T")

DESCRIPTION = """The qtasks command: `worker` runs a worker process, `demo` shows streaming,
and send/listen/status/cancel/inspect/workers/dead operate a deployment from a shell (see
docs/cli.md); `dashboard` serves the same in a browser.
Exit status: 0 done, 1 the task failed or was not found, 2 a usage, configuration or
connection error, 3 a --timeout ran out (the task goes on), 130 interrupted."""


def installed_version() -> str:
    """The version of the installed distribution (what ``pip`` installed), not a constant
    kept by hand."""
    try:
        return version("qtasks")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def log_level(text: str) -> int:
    """A logging level by name (any case) or number; a typo is refused with the names."""
    if text.strip().isdigit():
        return int(text)
    level = logging.getLevelName(text.strip().upper())
    if not isinstance(level, int):
        raise argparse.ArgumentTypeError(
            f"unknown log level {text!r}; use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, not {value}")
    return value


def port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, not {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, not {value}")
    return value


def positive_seconds(text: str) -> float:
    value = seconds(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected more than 0 seconds, not {text}")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, not {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected 0 or more seconds, not {text}")
    return value


def json_list(text: str) -> list[object]:
    """``--args``: argparse names the option in front of this message."""
    value = _json(text)
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError("expected a JSON array, e.g. '[1, 2]'")
    return value


def json_object(text: str) -> dict[str, object]:
    """``--kwargs``: argparse names the option in front of this message."""
    value = _json(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('expected a JSON object, e.g. \'{"a": 1}\'')
    return value


def _json(text: str) -> object:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None


def from_env(value: T | None, name: str, convert: Callable[[str], T], default: T) -> T:
    """The flag's value if given, else environment variable ``name`` checked with the
    flag's own check (an error names the variable), else ``default``."""
    if value is not None:
        return value
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return convert(raw)
    except argparse.ArgumentTypeError as exc:
        raise ConfigurationError(f"{name}={raw!r}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", type=log_level, default=None,
                        help="DEBUG, INFO (default), WARNING ... (default: $QTASKS_LOG_LEVEL)")
    parser = argparse.ArgumentParser(prog="qtasks", description=DESCRIPTION)
    parser.add_argument("--version", action="version",
                        version=f"qtasks {installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    urls = argparse.ArgumentParser(add_help=False, parents=[common])
    urls.add_argument("--broker", default=None,
                      help="broker URL (default: $QTASKS_BROKER_URL)")
    urls.add_argument("--results", default=None,
                      help="result store URL (default: $QTASKS_RESULTS_URL, else the broker)")

    worker = commands.add_parser("worker", help="run a worker for an app", parents=[urls])
    worker.add_argument("app", help="module:attribute of the QueueTasks app")
    worker.add_argument("--concurrency", "-c", type=positive_int, default=None,
                        help="tasks at once (default: $QTASKS_CONCURRENCY, else 100)")
    worker.add_argument("--queues", "-q", default=None,
                        help="comma-separated queues (default: $QTASKS_QUEUES, else every "
                             "queue of the app)")
    worker.add_argument("--grace", type=seconds, default=None,
                        help="seconds in-flight tasks may take to finish on SIGTERM "
                             "(default: $QTASKS_GRACE, else 30)")
    worker.add_argument("--connect-timeout", type=seconds, default=None,
                        help="give up connecting after this many seconds (default: the "
                             "backend's, 30 s for RabbitMQ and NATS)")
    worker.add_argument("--quiet", action="store_true",
                        help="no INFO line per finished task")
    worker.add_argument("--heartbeat", type=positive_seconds, default=None,
                        help="seconds between heartbeats on the control channel (a killed "
                             "worker drops off `qtasks workers` after three; default: "
                             "$QTASKS_HEARTBEAT, else 2)")
    worker.add_argument("--metrics-port", type=port, default=None,
                        help="serve Prometheus metrics on http://HOST:PORT/metrics (needs "
                             "qtasks[metrics]; 0: a free port, logged; default: "
                             "$QTASKS_METRICS_PORT, else none)")
    worker.add_argument("--metrics-host", default="127.0.0.1",
                        help="the address --metrics-port binds (default 127.0.0.1; "
                             "0.0.0.0 for every interface)")
    worker.add_argument("--beat", action="store_true",
                        help="also run the periodic scheduler (as `qtasks beat` does)")
    worker.add_argument("--beat-group", default="default",
                        help="with --beat: the group whose beats elect one leader")
    worker.add_argument("--lock-ttl", type=positive_seconds, default=None,
                        help="with --beat: seconds a dead leader holds the lead (default: "
                             "half the shortest schedule interval, 0.25..10)")

    beat = commands.add_parser("beat", parents=[urls],
                               help="run the periodic scheduler of an app (as many as you "
                                    "like: one leads, the others stand by)")
    beat.add_argument("app", help="module:attribute of the QueueTasks app")
    beat.add_argument("--group", default="default",
                      help="beats of one group elect one leader (default: default)")
    beat.add_argument("--lock-ttl", type=positive_seconds, default=None,
                      help="seconds a dead leader holds the lead (default: half the "
                           "shortest schedule interval, 0.25..10)")
    beat.add_argument("--connect-timeout", type=seconds, default=None,
                      help="give up connecting after this many seconds (default: the "
                           "backend's, 30 s for RabbitMQ and NATS)")

    demo = commands.add_parser("demo", help="stream the seed's generator task",
                               parents=[common])
    demo.add_argument("--url", default=None, help="broker URL (default: memory://)")
    demo.add_argument("-n", type=positive_int, default=5)
    demo.add_argument("--delay", type=seconds, default=0.2)

    remote = argparse.ArgumentParser(add_help=False, parents=[urls])
    remote.add_argument("--connect-timeout", type=seconds, default=10.0)
    remote.add_argument("--json", action="store_true",
                        help="one JSON object per line (shapes: docs/cli.md)")

    send = commands.add_parser("send", parents=[remote], help="enqueue a task by name")
    send.add_argument("task")
    send.add_argument("--args", type=json_list, default=[], help="JSON array of arguments")
    send.add_argument("--kwargs", type=json_object, default={},
                      help="JSON object of keyword arguments (any names, options included: "
                           "they are the task's)")
    send.add_argument("--queue")
    send.add_argument("--priority", type=int)
    send.add_argument("--delay", type=seconds)
    send.add_argument("--wait", action="store_true", help="wait for the final result")
    send.add_argument("--stream", action="store_true", help="print partials as they arrive")
    send.add_argument("--timeout", type=seconds, default=None,
                      help="with --wait/--stream: give up waiting after this many seconds")

    listen = commands.add_parser("listen", parents=[remote],
                                 help="print live events of a task name ('*': all)")
    listen.add_argument("task")
    listen.add_argument("--limit", type=positive_int, default=None,
                        help="stop after N events")

    status = commands.add_parser("status", parents=[remote], help="one task's state")
    status.add_argument("id")
    status.add_argument("--idle", type=seconds, default=0.5,
                        help="stop reading a running task's partials after this many "
                             "seconds without one")

    cancel = commands.add_parser("cancel", parents=[remote],
                                 help="ask the workers to cancel a task")
    cancel.add_argument("id")
    cancel.add_argument("--reason", default="", help="recorded in the task's error")
    cancel.add_argument("--wait", action="store_true",
                        help="wait until the task has ended and print how")
    cancel.add_argument("--timeout", type=seconds, default=None)

    inspect_ = commands.add_parser("inspect", parents=[remote], help="queue depths")
    workers = commands.add_parser("workers", parents=[remote], help="the live workers")
    workers.add_argument("--wait", type=seconds, default=0.5,
                         help="seconds to collect the workers' answers to a ping")
    workers.add_argument("--watch", action="store_true",
                         help="print each change (joined, updated, left, lost) as it happens")
    workers.add_argument("--limit", type=positive_int, default=None,
                         help="with --watch: stop after N changes")
    inspect_.add_argument("--queues", default="default", help="comma-separated")

    dead = commands.add_parser("dead", parents=[remote], help="dead letters")
    dead.add_argument("action", choices=["list", "requeue", "purge"])
    dead.add_argument("refs", nargs="*", help="requeue only these (default: all)")
    dead.add_argument("--limit", type=positive_int, default=100)
    dead.add_argument("--yes", "-y", action="store_true",
                      help="purge without asking (needed when not on a terminal)")

    board = commands.add_parser("dashboard", parents=[urls],
                                help="serve the web dashboard (extra qtasks[dashboard])")
    board.add_argument("app", nargs="?", default=None,
                       help="module:attribute of the QueueTasks app (optional: else "
                            "--broker/--results)")
    board.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1, this machine only)")
    board.add_argument("--port", type=port, default=8080, help="default: 8080 (0: any free)")
    board.add_argument("--allow-actions", action="store_true",
                       help="allow cancel, requeue, purge and submit, each with the token")
    board.add_argument("--token", default=None,
                       help="the actions' token, 16 characters or more (default: "
                            "$QTASKS_DASHBOARD_TOKEN, else one is generated and printed)")
    board.add_argument("--queues", default=None,
                       help="comma-separated queues to show besides those the workers "
                            "consume (default: the app's, else 'default')")
    board.add_argument("--connect-timeout", type=seconds, default=None,
                       help="give up connecting after this many seconds (default: 10)")
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what the environment may give (the URLs, the log level, the worker's numbers),
    checking each value where it came from."""
    args.log_level = from_env(args.log_level, "QTASKS_LOG_LEVEL", log_level, logging.INFO)
    if hasattr(args, "broker") and args.command != "worker":  # the worker: see cli.py
        args.broker = args.broker or os.environ.get("QTASKS_BROKER_URL") or None
        args.results = args.results or os.environ.get("QTASKS_RESULTS_URL") or None
    if args.command == "dashboard":
        args.token = args.token or os.environ.get("QTASKS_DASHBOARD_TOKEN") or None
    if args.command == "worker":
        args.concurrency = from_env(args.concurrency, "QTASKS_CONCURRENCY", positive_int, 100)
        args.grace = from_env(args.grace, "QTASKS_GRACE", seconds, 30.0)
        args.heartbeat = from_env(args.heartbeat, "QTASKS_HEARTBEAT", positive_seconds, 2.0)
        args.metrics_port = from_env(args.metrics_port, "QTASKS_METRICS_PORT", port, None)
        queues = args.queues or os.environ.get("QTASKS_QUEUES") or ""
        args.queues = [q.strip() for q in queues.split(",") if q.strip()] or None
    return args

