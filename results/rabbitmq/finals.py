"""Group commit of final results, and the envelope every result message wears.

The finals of different tasks that are ready while ``FINALS_IN_FLIGHT`` final messages
await their confirm go out together as one ``batch`` message, routed with every task's key
(the first as routing key, the others in the ``CC`` header, the submitters' inboxes in
``BCC``). Each of its tasks is acked only after that message is confirmed, exactly as for
a final sent alone; under load the broker stores and routes one message per group instead
of one per task, and at a low rate a final leaves at once (at the end of the event-loop
turn, with the finals of that turn): grouping costs no latency.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiormq import spec

from qtasks.brokers.rabbitmq.settings import result_routing_key
from qtasks.protocol import ResultEvent, encode_batch

#: Final messages awaiting their confirm before the next finals wait and go out together.
FINALS_IN_FLIGHT = 1
FINALS_MAX_EVENTS = 256
FINALS_MAX_BYTES = 256 * 1024
#: The routing keys of a group travel in its content header, which must fit one frame.
FINALS_MAX_KEY_BYTES = 32 * 1024

#: Publishes one message (body, properties, routing key) and awaits its confirm.
Send = Callable[[bytes, spec.Basic.Properties, str], Awaitable[None]]


def envelope(task_id: str, task: str, attempt: int, kind: str, detail: object,
             reply_to: str | None) -> tuple[spec.Basic.Properties, str]:
    """The properties and routing key of a result message of one task (docs/rabbitmq.md);
    ``detail`` makes its ``message_id`` unique (a partial's seq, a status)."""
    headers: dict[str, Any] = {"x-qtasks-task": task, "x-qtasks-attempt": attempt}
    if reply_to:
        headers["BCC"] = [reply_to]  # also to the submitter's inbox; stripped on delivery
    properties = spec.Basic.Properties(
        delivery_mode=2, content_type="application/json", correlation_id=task_id,
        message_type=kind, app_id="qtasks", headers=headers,
        message_id=f"{task_id}.{attempt}.{kind}.{detail}")
    return properties, result_routing_key(task, task_id)


@dataclass(slots=True)
class _Final:
    """A final waiting for its group's confirm."""

    event: ResultEvent
    body: bytes
    reply_to: str | None
    key: str  # its routing key
    stored: asyncio.Future[None]


class FinalsCommitter:
    """Finals waiting to be published in groups, and how many groups await a confirm."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._waiting: deque[_Final] = deque()
        self._in_flight = 0
        self._scheduled = False

    async def commit(self, event: ResultEvent, body: bytes, reply_to: str | None) -> None:
        """Returns once the final is confirmed, alone or in a group; raises what its
        group's publish raised."""
        final = _Final(event, body, reply_to, result_routing_key(event.task, event.id),
                       asyncio.get_running_loop().create_future())
        self._waiting.append(final)
        self._schedule()
        await final.stored

    def _schedule(self) -> None:
        if self._waiting and not self._scheduled and self._in_flight < FINALS_IN_FLIGHT:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send_group)

    def _send_group(self) -> None:
        """Publish the waiting finals (as many as one message takes) without waiting for
        the confirm; ``_group_sent`` settles them."""
        self._scheduled = False
        group: list[_Final] = []
        size = keys = 0
        while self._waiting and len(group) < FINALS_MAX_EVENTS:
            final = self._waiting[0]
            key_size = len(final.key) + len(final.reply_to or "") + 16
            if group and (size + len(final.body) > FINALS_MAX_BYTES
                          or keys + key_size > FINALS_MAX_KEY_BYTES):
                break
            self._waiting.popleft()
            if not final.stored.done():  # not abandoned by a cancelled publish
                group.append(final)
                size += len(final.body)
                keys += key_size
        if not group:
            return
        body, properties, key = _group_message(group)
        self._in_flight += 1
        sent = asyncio.ensure_future(self._send(body, properties, key))
        sent.add_done_callback(lambda done: self._group_sent(group, done))
        self._schedule()

    def _group_sent(self, group: list[_Final], sent: asyncio.Future[None]) -> None:
        self._in_flight -= 1
        # A publish cancelled under it (the loop shutting down) is a failed send to each
        # waiter, which ``retrying`` may send again; not a cancellation of its task.
        error = ConnectionError("the publish of a group of finals was cancelled") \
            if sent.cancelled() else sent.exception()
        for final in group:
            if final.stored.done():
                continue
            if error is None:
                final.stored.set_result(None)
            else:
                final.stored.set_exception(error)
        self._schedule()


def _group_message(group: list[_Final]) -> tuple[bytes, spec.Basic.Properties, str]:
    first = group[0]
    if len(group) == 1:
        event = first.event
        properties, key = envelope(event.id, event.task, event.attempt, "final",
                                   event.status, first.reply_to)
        return first.body, properties, key
    keys = list(dict.fromkeys(f.key for f in group))
    replies = list(dict.fromkeys(f.reply_to for f in group if f.reply_to))
    headers: dict[str, Any] = {"CC": keys[1:]}
    if replies:
        headers["BCC"] = replies
    properties = spec.Basic.Properties(
        delivery_mode=2, content_type="application/json", message_type="batch",
        app_id="qtasks", headers=headers,
        message_id=f"{first.event.id}.{first.event.attempt}.finals.{len(group)}")
    return encode_batch(None, None, [f.body for f in group]), properties, keys[0]
