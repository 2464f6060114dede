"""The operator commands behind ``qtasks send|listen|status|inspect|dead``.

Each takes broker/result URLs (flags or ``QTASKS_BROKER_URL``/``QTASKS_RESULTS_URL``),
never the task code, so they work from any shell against any deployment. Output is for a
person by default and one JSON object per line with ``--json``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, TextIO

import orjson

from qtasks.app import QueueTasks
from qtasks.errors import BrokerUnavailableError, ConfigurationError
from qtasks.protocol import ResultEvent
from qtasks.registry import redact
from qtasks.task import Restarted, Task


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


class Operator:
    """One connection for one command, opened with a deadline and a clear error."""

    def __init__(self, broker: str, results: str | None, connect_timeout: float = 10.0,
                 out: TextIO = sys.stdout) -> None:
        self.urls = (broker, results or broker)
        self.app = QueueTasks(broker=broker, results=results or broker, embedded_worker=False)
        self.connect_timeout = connect_timeout
        self.out = out

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    async def __aenter__(self) -> Operator:
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self.app.start()
        except (TimeoutError, OSError, ConnectionError) as exc:
            where = " / ".join(redact(u) for u in dict.fromkeys(self.urls))
            raise BrokerUnavailableError(
                f"cannot reach {where} within {self.connect_timeout:g} s"
                f"{': ' + str(exc) if str(exc) else ''}") from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.app.close()

    async def send(self, task_name: str, args: list[Any], kwargs: dict[str, Any], *,
                   queue: str | None, priority: int | None, delay: float | None, wait: bool,
                   stream: bool, timeout: float | None, as_json: bool) -> int:
        task = await self.app.add_task(task_name, *args, queue=queue, priority=priority,
                                       delay=delay, **kwargs)
        self.say(_json({"id": task.id, "task": task_name}) if as_json
                 else f"sent {task_name} {task.id}")
        if not (wait or stream):
            return 0
        async with asyncio.timeout(timeout):
            if stream:
                count = 0
                async for value in task.stream():
                    if isinstance(value, Restarted):
                        self.say(f"-- attempt {value.attempt} starts over")
                        continue
                    count += 1
                    self.say(_json(value) if as_json else f"[{count}] {_json(value)}")
            await task.wait()
        state = task_state(task)
        outcome = task.returning if task.error is None else state["error"]
        self.say(_json(state) if as_json else f"{task.status.value}: {_json(outcome)}")
        return 0 if task.status.value == "success" else 1

    async def listen(self, task_name: str, as_json: bool, limit: int | None) -> int:
        events = await self.app.subscribe(task_name)
        # On stderr, so that --json output stays pure and a caller can tell when the
        # subscription is active.
        print(f"listening to {task_name} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        seen = 0
        async for event in events:
            self.say(_json(event.to_dict()) if as_json else describe_event(event))
            seen += 1
            if limit is not None and seen >= limit:
                break
        return 0

    async def status(self, task_id: str, as_json: bool) -> int:
        task = await self.app.get(task_id)
        if task is None:
            self.say(f"no task {task_id} (unknown, not started yet, or expired)")
            return 1
        state = task_state(task)
        if as_json:
            self.say(_json(state))
        else:
            for key, value in state.items():
                if key in ("started_at", "finished_at"):
                    value = _clock(value)
                elif key == "error" and value:
                    value = f"{value['type']}: {value['message']}\n{value['traceback']}"
                self.say(f"{key:>11}: {value}")
        return 0

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
        stats = await self.app.broker.inspect(queues)
        dead = len(await self.app.broker.dead_letters(limit=10_000))
        if as_json:
            self.say(_json({"queues": [asdict(s) for s in stats], "dead_letters": dead}))
            return 0
        self.say(f"{'queue':<24} {'ready':>8} {'in flight':>10} {'consumers':>10}")
        for s in stats:
            self.say(f"{s.queue:<24} {s.ready:>8} {_opt(s.in_flight):>10} "
                     f"{_opt(s.consumers):>10}")
        self.say(f"dead letters: {dead}")
        return 0

    async def dead(self, action: str, refs: Sequence[str], limit: int, as_json: bool) -> int:
        broker = self.app.broker
        if action == "list":
            letters = await broker.dead_letters(limit)
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
        elif action == "requeue":
            self.say(f"requeued {await broker.requeue_dead(list(refs) or None)}")
        elif action == "purge":
            self.say(f"purged {await broker.purge_dead()}")
        else:
            raise ConfigurationError(f"unknown dead-letter action {action!r}")
        return 0


def _opt(value: int | None) -> str:
    return "-" if value is None else str(value)
