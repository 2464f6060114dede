"""The operator commands behind ``qtasks send|listen|status|cancel|inspect|dead``.

Each takes broker/result URLs (flags or ``QTASKS_BROKER_URL``/``QTASKS_RESULTS_URL``),
never the task code, so they work from any shell against any deployment. Output is for a
person by default and one JSON object per line with ``--json`` (every shape is in
``docs/cli.md``); partials are numbered by the protocol's ``seq`` in both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any, TextIO

import orjson

from qtasks.app import QueueTasks
from qtasks.control import WorkerState, ping_workers
from qtasks.errors import (
    BrokerUnavailableError,
    ConfigurationError,
    NotSupportedError,
    QTasksError,
    TaskTimeoutError,
)
from qtasks.interfaces import Broker, ResultStore, close_iterator
from qtasks.protocol import ResultEvent
from qtasks.registry import broker_from_url, redact, results_from_url
from qtasks.task import Task

log = logging.getLogger(__name__)

#: QTasks' own backends log each retry while they connect; a command reports the outcome
#: in one line instead (``--log-level DEBUG`` shows them).
BACKEND_LOGGERS = ("qtasks.brokers", "qtasks.results")
#: How long ``inspect`` listens for the workers' answers to its ping: every connected
#: worker answers at once, so this is a round trip with room for a busy worker's loop.
PING_WAIT = 0.5


def _clock(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts % 1 * 1000):03d}"


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def describe_event(event: ResultEvent) -> str:
    head = f"{_clock(event.ts)} {event.task} {event.id} #{event.attempt}"
    if event.kind == "partial":
        return f"{head} partial[{event.seq}] {_json(event.value)}"
    if event.kind == "status":
        extra = f" after {event.error.type}: {event.error.message}" if event.error else ""
        return f"{head} {event.status}{extra}"
    if event.error:
        return f"{head} {event.status} {event.error.type}: {event.error.message}"
    return f"{head} {event.status} returning={_json(event.returning)}"


def task_state(task: Task) -> dict[str, Any]:
    return {
        "id": task.id, "task": task.name, "status": task.status.value,
        "attempt": task.attempt, "returning": task.returning,
        "error": task.error.to_dict() if task.error else None,
        "started_at": task.started_at, "finished_at": task.finished_at,
        "worker": task.worker, "partials": task.partials,
    }


@contextlib.contextmanager
def quiet_backends() -> Iterator[None]:
    """While connecting, only the outcome counts: the backends' retry lines are raised to
    ERROR, unless the root logger is at DEBUG (a user looking into why)."""
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        yield
        return
    saved = [(logger, logger.level) for logger in map(logging.getLogger, BACKEND_LOGGERS)]
    for logger, _ in saved:
        logger.setLevel(max(logging.ERROR, logger.level))
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


async def connect(app: QueueTasks, timeout: float | None, where: str) -> None:
    """``app.start()`` within ``timeout`` (a backstop: the backends have their own
    deadline, whose error says more, such as refused credentials). A failure leaves
    nothing open behind it and is a ``QTasksError``: one line for the user."""
    try:
        with quiet_backends():
            async with asyncio.timeout(timeout):
                await app.start()
    except QTasksError:
        await _abandon(app)
        raise
    except (TimeoutError, OSError) as exc:
        await _abandon(app)
        detail = f": {type(exc).__name__}: {exc}" if str(exc) else ""
        within = f" within {timeout:g} s" if timeout is not None else ""
        raise BrokerUnavailableError(f"cannot reach {where}{within}{detail}") from None


async def _abandon(app: QueueTasks) -> None:
    """Close whichever half of the app had connected, so no client goes on reconnecting
    (and logging) while the process exits."""
    for backend in (app.broker, app.results_store):
        with contextlib.suppress(Exception):
            await backend.close()


def _backend(make: Callable[..., Any], url: str, connect_timeout: float) -> Any:
    """A backend given ``connect_timeout`` as its own deadline when it takes that option
    (RabbitMQ and NATS do; ``memory://`` and some third-party backends do not)."""
    try:
        return make(url, connect_timeout=connect_timeout)
    except (TypeError, ConfigurationError):
        return make(url)  # its own error, if the URL itself is wrong


def ask_on_terminal(question: str) -> bool:
    """A yes/no question on the terminal; refused when there is none to ask on."""
    if not sys.stdin.isatty():
        raise ConfigurationError(f"{question.rstrip('?')}: pass --yes to confirm "
                                 "(no terminal to ask on)")
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


class Operator:
    """One connection for one command, opened with a deadline and a clear error."""

    def __init__(self, broker: str, results: str | None, connect_timeout: float = 10.0,
                 out: TextIO = sys.stdout,
                 confirm: Callable[[str], bool] = ask_on_terminal) -> None:
        self.urls = (broker, results or broker)
        self.app = QueueTasks(
            broker=_backend(broker_from_url, broker, connect_timeout),
            results=_backend(results_from_url, results or broker, connect_timeout),
            embedded_worker=False)
        self.connect_timeout = connect_timeout
        self.out = out
        self.confirm = confirm

    @property
    def broker(self) -> Broker:
        return self.app.broker

    @property
    def results_store(self) -> ResultStore:
        return self.app.results_store

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    async def __aenter__(self) -> Operator:
        where = " / ".join(redact(u) for u in dict.fromkeys(self.urls))
        # The backstop comes a little after the backends' own deadline, whose error says
        # why (refused credentials, say) where ours could only say "not within".
        await connect(self.app, self.connect_timeout + 5, where)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.app.close()

    async def send(self, task_name: str, args: list[Any], kwargs: dict[str, Any], *,
                   queue: str | None, priority: int | None, delay: float | None, wait: bool,
                   stream: bool, timeout: float | None, as_json: bool) -> int:
        # send_task: every name in kwargs is the task's argument, never an option.
        task = await self.app.send_task(task_name, args, kwargs, queue=queue,
                                        priority=priority, delay=delay)
        self.say(_json({"id": task.id, "task": task_name}) if as_json
                 else f"sent {task_name} {task.id}")
        if not (wait or stream):
            return 0
        timer = asyncio.timeout(timeout)
        try:
            async with timer:
                if stream:
                    await self._print_partials(task, as_json)
                await task.wait()
        except TimeoutError:
            if not timer.expired():
                raise
            raise TaskTimeoutError(task.id, timeout) from None
        state = task_state(task)
        outcome = task.returning if task.error is None else state["error"]
        self.say(_json(state) if as_json else f"{task.status.value}: {_json(outcome)}")
        return 0 if task.status.value == "success" else 1

    async def _print_partials(self, task: Task, as_json: bool) -> None:
        attempt = 0
        async for event in task.events():
            if event.kind != "partial":
                continue
            if attempt and event.attempt != attempt and not as_json:
                self.say(f"-- attempt {event.attempt} starts over")
            attempt = event.attempt
            self.say(_json(event.to_dict()) if as_json
                     else f"[{event.seq}] {_json(event.value)}")

    async def listen(self, task_name: str, as_json: bool, limit: int | None) -> int:
        events = await self.app.subscribe(task_name)
        # On stderr, so that --json output stays pure and a caller can tell when the
        # subscription is active.
        print(f"listening to {task_name} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        seen = 0
        try:
            async for event in events:
                self.say(_json(event.to_dict()) if as_json else describe_event(event))
                seen += 1
                if limit is not None and seen >= limit:
                    break
        finally:
            await close_iterator(events)
        return 0

    async def status(self, task_id: str, as_json: bool, idle: float = 0.5) -> int:
        task = await self.app.get(task_id)
        if task is None:
            self.say(_json({"id": task_id, "status": None}) if as_json
                     else f"no task {task_id} (unknown, not started yet, or expired)")
            return 1
        handle, count, last = await self.progress(task, idle)
        state = task_state(handle)
        state["partials"] = handle.partials if handle.status.finished else count
        state["last_partial"] = last
        if as_json:
            self.say(_json(state))
            return 0
        for key, value in state.items():
            if key in ("started_at", "finished_at"):
                value = _clock(value)
            elif key == "error":
                value = (f"{value['type']}: {value['message']}\n{value['traceback']}"
                         if value else "-")
            elif key in ("returning", "last_partial"):
                value = _json(value)
            self.say(f"{key:>12}: {value}")
        return 0

    async def progress(self, task: Task, idle: float) -> tuple[Task, int, Any]:
        """Read the task's events from the first until its final or until none came for
        ``idle`` seconds: (the freshest handle, partials of the latest attempt so far, the
        last partial value). ``get`` holds the latest status only, not the partials."""
        handle = self.app.task_handle(task.id, task.name)
        count, last, attempt = 0, None, 0
        events = handle.events()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(idle) as timer:
                async for event in events:
                    timer.reschedule(loop.time() + idle)
                    if event.kind != "partial":
                        continue
                    if event.attempt != attempt:
                        count, attempt = 0, event.attempt
                    count, last = count + 1, event.value
        except TimeoutError:
            pass  # the feed went idle: what was read is the progress so far
        finally:
            await close_iterator(events)
        return (handle if handle.status.finished else task), count, last

    async def cancel(self, task_id: str, reason: str, wait: bool, timeout: float | None,
                     as_json: bool) -> int:
        await self.app.cancel(task_id, reason)
        if not wait:
            self.say(_json({"id": task_id, "cancel": "sent"}) if as_json
                     else f"cancel of {task_id} sent to the workers")
            return 0
        task = await self.app.task_handle(task_id).wait(timeout)
        self.say(_json(task_state(task)) if as_json else f"{task_id}: {task.status.value}")
        return 0 if task.status.value == "cancelled" else 1

    async def inspect(self, queues: Sequence[str], as_json: bool) -> int:
        """Each queue's depth from the broker; what the broker cannot say (RabbitMQ's
        unacked count, how many workers share a NATS pull consumer) from the workers'
        answers to a ping, so the columns mean the same on every broker."""
        stats = await self.broker.inspect(queues)
        workers = await self.workers()
        for s in stats:
            serving = [w for w in workers if s.queue in w.queues]
            if s.in_flight is None:
                s.in_flight = sum(w.in_flight.get(s.queue, 0) for w in serving)
            if s.consumers is None:
                s.consumers = len(serving)
        try:
            dead: int | None = await self.broker.dead_count()
        except NotSupportedError:
            dead = None
        if as_json:
            self.say(_json({"queues": [asdict(s) for s in stats], "dead_letters": dead,
                            "workers": [w.to_dict() for w in workers]}))
            return 0
        self.say(f"{'queue':<24} {'ready':>8} {'in flight':>10} {'consumers':>10}")
        for s in stats:
            self.say(f"{s.queue:<24} {s.ready:>8} {_opt(s.in_flight):>10} "
                     f"{_opt(s.consumers):>10}")
        self.say(f"dead letters: {_opt(dead)}")
        for w in workers:
            self.say(f"worker {w.id} ({w.host} pid {w.pid}): {sum(w.in_flight.values())}/"
                     f"{w.concurrency} in flight, {w.processed} handled, "
                     f"queues {','.join(w.queues)}")
        return 0

    async def workers(self) -> list[WorkerState]:
        """The workers connected now, as they answer a ping (none where the broker has
        no control channel)."""
        try:
            control = await self.broker.control()
        except NotSupportedError:
            return []
        return await ping_workers(self.broker.broadcast, control, self.app.runtime.seal,
                                  wait=PING_WAIT)

    async def dead(self, action: str, refs: Sequence[str], limit: int, as_json: bool,
                   yes: bool = False) -> int:
        if action == "list":
            return await self._dead_list(limit, as_json)
        if action == "requeue":
            return await self._dead_requeue(list(dict.fromkeys(refs)), as_json)
        if action == "purge":
            return await self._dead_purge(as_json, yes)
        raise ConfigurationError(f"unknown dead-letter action {action!r}")

    async def _dead_list(self, limit: int, as_json: bool) -> int:
        letters = await self.broker.dead_letters(limit)
        for letter in letters:
            body = letter.body.decode("utf-8", "replace")
            if as_json:
                self.say(_json({"ref": letter.ref, "queue": letter.queue,
                                "reason": letter.reason, "at": letter.at, "body": body}))
            else:
                self.say(f"{letter.ref} {_clock(letter.at)} {letter.queue}: {letter.reason}"
                         f"\n    {body[:200]}")
        if not as_json:
            self.say(f"{len(letters)} dead letter(s)")
        return 0

    async def _dead_requeue(self, refs: list[str], as_json: bool) -> int:
        done = await self.broker.requeue_dead(refs or None)
        self.say(_json({"requeued": done}) if as_json else f"requeued {len(done)}")
        missing = [ref for ref in refs if ref not in done]
        if missing:
            print(f"qtasks: no dead letter {', '.join(missing)} (see: qtasks dead list)",
                  file=sys.stderr, flush=True)
            return 1
        return 0

    async def _dead_purge(self, as_json: bool, yes: bool) -> int:
        if not yes:
            try:
                count: int | str = await self.broker.dead_count()
            except NotSupportedError:
                count = "every"
            question = f"purge {count} dead letter(s) for good?"
            if not await asyncio.to_thread(self.confirm, question):
                print("qtasks: nothing purged", file=sys.stderr, flush=True)
                return 1
        purged = await self.broker.purge_dead()
        self.say(_json({"purged": purged}) if as_json else f"purged {purged}")
        return 0


def _opt(value: int | None) -> str:
    return "-" if value is None else str(value)
