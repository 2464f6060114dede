"""Wire protocol version 1: the messages that cross a broker, and their codec.

Every message is one JSON object encoded with orjson. The same shapes are written up
field by field in ``docs/protocol.md`` so that a producer or a listener written in another
language can take part. The dataclasses here are the single source of truth for that
document: a field added here and not there is a bug.

Three kinds travel on the result side (``status``, ``partial``, ``final``) and one on the
task side (``task``); what is broadcast on the control channel is in ``qtasks.control``.
Timestamps are Unix seconds as floats, which every language reads.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson

from qtasks.errors import MessageDecodeError, MessageEncodeError, MessageTooLargeError

log = logging.getLogger(__name__)

VERSION = 1

#: Default upper bound for one encoded task message; brokers may lower it.
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024

ResultKind = Literal["status", "partial", "final"]


def uuid7() -> str:
    """A time-ordered UUID (RFC 9562 version 7) as a string.

    Time order lets a log-structured result store (a RabbitMQ stream, a JetStream stream)
    start reading a task's results from the moment its id was made instead of from the
    beginning. Python 3.11 has no ``uuid.uuid7``, hence these few lines.
    """
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & 0x3FFF_FFFF_FFFF_FFFF  # rand_b, 62 bits
    return str(uuid.UUID(int=value))


def uuid7_time(task_id: str) -> float | None:
    """Creation time (Unix seconds) encoded in a UUIDv7, or None for other ids."""
    try:
        parsed = uuid.UUID(task_id)
    except ValueError:
        return None
    if parsed.version != 7:
        return None
    return (parsed.int >> 80) / 1000.0


@dataclass(slots=True)
class TaskMessage:
    """A request to run ``task`` with ``args``/``kwargs``, as a broker carries it."""

    id: str
    task: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str = "default"
    priority: int = 0
    created_at: float = 0.0
    attempt: int = 1
    max_time: float | None = None
    not_before: float | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "kind": "task",
            "id": self.id,
            "task": self.task,
            "args": self.args,
            "kwargs": self.kwargs,
            "queue": self.queue,
            "priority": self.priority,
            "created_at": self.created_at,
            "attempt": self.attempt,
            "max_time": self.max_time,
            "not_before": self.not_before,
            "headers": self.headers,
        }


@dataclass(slots=True)
class ErrorInfo:
    """Why a task failed: enough to understand it without the worker's logs."""

    type: str
    message: str
    traceback: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message, "traceback": self.traceback}


@dataclass(slots=True)
class ResultEvent:
    """One message on the result side: a status change, a partial value, or the final.

    ``status`` events say that an attempt started (``running``) or that a failed attempt
    was scheduled again (``new``, with the failed attempt's ``error``). ``partial`` events
    carry one yielded value each, numbered by ``seq`` from 0 within an attempt. ``final``
    is the last event of a task: its outcome, its ``returning`` value and how many partials
    the attempt published.
    """

    kind: ResultKind
    id: str
    task: str
    attempt: int = 1
    seq: int = 0
    value: Any = None
    ts: float = 0.0
    status: str | None = None
    returning: Any = None
    error: ErrorInfo | None = None
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    partials: int = 0
    #: When the task was submitted, so that any reader (not only its submitter) knows.
    created_at: float | None = None
    #: Past this time readers treat the result as gone (the task's ``result_ttl``).
    expires_at: float | None = None
    #: The task's arguments, on ``status`` and ``final`` events, so that any reader (the
    #: dashboard) can show what a run was called with; None when they were left out
    #: (over ``qtasks.running.ARGUMENTS_SHOWN`` bytes) or from an older worker.
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    #: On a ``running`` status only: a worker's claim on one copy of a workflow's task,
    #: ``<copy token>:<nonce>``; the attempt's first claim in the log runs
    #: (``qtasks.canvas.claims``, docs/workflows.md).
    claim: str | None = None

    def to_dict(self) -> dict[str, Any]:
        base: dict[str, Any] = {
            "v": VERSION, "kind": self.kind, "id": self.id, "task": self.task,
            "attempt": self.attempt, "ts": self.ts,
        }
        if self.kind == "partial":
            base["seq"] = self.seq
            base["value"] = self.value
            return base
        base["status"] = self.status
        base["error"] = self.error.to_dict() if self.error else None
        base["created_at"] = self.created_at
        base["started_at"] = self.started_at
        base["worker"] = self.worker
        if self.args is not None:
            base["args"] = self.args
            base["kwargs"] = self.kwargs or {}
        if self.claim is not None:
            base["claim"] = self.claim
        if self.kind == "final":
            base["returning"] = self.returning
            base["finished_at"] = self.finished_at
            base["partials"] = self.partials
            if self.expires_at is not None:
                base["expires_at"] = self.expires_at
        return base

    def expired(self, now: float) -> bool:
        """A final past its ``result_ttl``: readers treat the task as unknown."""
        return self.expires_at is not None and self.expires_at <= now

    @property
    def is_final(self) -> bool:
        return self.kind == "final"


class Message(Protocol):
    """Any message of the protocol: it knows its JSON object and its id."""

    id: str

    def to_dict(self) -> dict[str, Any]: ...


def encode(message: Message, max_size: int | None = None) -> bytes:
    """Serialise a message, refusing what JSON cannot carry or what is too large."""
    try:
        body = orjson.dumps(message.to_dict(), option=orjson.OPT_NON_STR_KEYS)
    except TypeError as exc:
        raise MessageEncodeError(
            f"{_describe(message)}: cannot encode as JSON ({exc}); "
            "pass JSON-compatible arguments (str, int, float, bool, None, list, dict)"
        ) from exc
    if max_size is not None and len(body) > max_size:
        raise MessageTooLargeError(
            f"{_describe(message)}: encoded message is {len(body)} bytes, "
            f"over the limit of {max_size} bytes (QueueTasks(max_message_size=...))"
        )
    return body


def _describe(message: Message) -> str:
    task = getattr(message, "task", None)
    if task is None:
        return f"{getattr(message, 'kind', 'message')} of id {message.id}"
    return f"task {task!r} id {message.id}"


#: JSON's types as the protocol names them, for the decoder's errors.
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "an array",
               dict: "an object"}


def typed_field(data: dict[str, Any], key: str, kind: type, default: Any = ...) -> Any:
    """``data[key]``, exactly of the protocol's type: a number written as a string, a bool
    for a number or a float for an integer is refused, never coerced (a message that needs
    coercing was not written to the protocol, and running it could do the wrong thing).
    A JSON integer is a number. Absent or null takes ``default`` when there is one."""
    value = data.get(key)
    if value is None and default is not ...:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise MessageDecodeError(
            f"field {key!r} must be {_TYPE_NAMES[kind]}"
            f"{' or null' if default is None else ''}, not {_json_type(value)} {value!r:.60}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def load_body(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MessageDecodeError(f"body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise MessageDecodeError(f"body is JSON but not an object: {type(data).__name__}")
    version = data.get("v")
    if type(version) is not int or version != VERSION:  # True == 1, 1.0 == 1
        raise MessageDecodeError(f"unsupported protocol version {version!r}")
    return data


def decode_task(body: bytes) -> TaskMessage:
    """Parse a task message, with an error that says exactly which field is wrong."""
    data = load_body(body)
    if data.get("kind", "task") != "task":
        raise MessageDecodeError(f"expected kind 'task', got {data.get('kind')!r}")
    headers = typed_field(data, "headers", dict, {})
    for name, value in headers.items():
        if not isinstance(value, str):
            raise MessageDecodeError(
                f"header {name!r} must be a string, not {_json_type(value)} {value!r:.60}")
    attempt = typed_field(data, "attempt", int, 1)
    if attempt < 1:
        raise MessageDecodeError(f"field 'attempt' must be 1 or more, not {attempt}")
    return TaskMessage(
        id=typed_field(data, "id", str),
        task=typed_field(data, "task", str),
        args=typed_field(data, "args", list, []),
        kwargs=typed_field(data, "kwargs", dict, {}),
        queue=typed_field(data, "queue", str, "default") or "default",
        priority=typed_field(data, "priority", int, 0),
        created_at=typed_field(data, "created_at", float, 0.0),
        attempt=attempt,
        max_time=typed_field(data, "max_time", float, None),
        not_before=typed_field(data, "not_before", float, None),
        headers=headers,
    )


def decode_result(body: bytes) -> ResultEvent:
    return _result_of(load_body(body))


def decode_results(body: bytes) -> list[ResultEvent]:
    """The events of one result message: one, or the partials of a ``batch`` (a backend
    may gather a task's partials into one message when they come faster than the broker
    takes them; ``encode_batch``)."""
    data = load_body(body)
    if data.get("kind") != "batch":
        return [_result_of(data)]
    events = data.get("events")
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise MessageDecodeError("'events' of a batch must be a list of objects")
    return [_result_of(event) for event in events]


def encode_batch(task_id: str | None, task: str | None, bodies: list[bytes]) -> bytes:
    """One message of several encoded events, in order: the partials of one task, or
    (``task_id`` and ``task`` None) the finals of several. Their bytes are reused as they
    are."""
    head = orjson.dumps({"v": VERSION, "kind": "batch", "id": task_id, "task": task})
    return head[:-1] + b',"events":[' + b",".join(bodies) + b"]}"


def _result_of(data: dict[str, Any]) -> ResultEvent:
    kind = data.get("kind")
    if kind not in ("status", "partial", "final"):
        raise MessageDecodeError(f"unknown result kind {kind!r}")
    error = typed_field(data, "error", dict, None)
    return ResultEvent(
        kind=kind,
        id=typed_field(data, "id", str),
        task=typed_field(data, "task", str),
        attempt=typed_field(data, "attempt", int, 1),
        seq=typed_field(data, "seq", int, 0),
        value=data.get("value"),
        ts=typed_field(data, "ts", float, 0.0),
        status=typed_field(data, "status", str, None),
        returning=data.get("returning"),
        error=None if error is None else ErrorInfo(
            typed_field(error, "type", str, ""), typed_field(error, "message", str, ""),
            typed_field(error, "traceback", str, "")),
        started_at=typed_field(data, "started_at", float, None),
        finished_at=typed_field(data, "finished_at", float, None),
        worker=typed_field(data, "worker", str, None),
        partials=typed_field(data, "partials", int, 0),
        created_at=typed_field(data, "created_at", float, None),
        expires_at=typed_field(data, "expires_at", float, None),
        args=typed_field(data, "args", list, None),
        kwargs=typed_field(data, "kwargs", dict, None),
        claim=typed_field(data, "claim", str, None),
    )


def read_results(body: bytes, source: str) -> list[ResultEvent]:
    """The events of one result message as a reader takes them: none, and one error
    logged naming ``source``, when it cannot be decoded. One bad message on a result
    subject must never stop a reader (``wait``, ``stream``, ``listen``, a replay)."""
    try:
        return decode_results(body)
    except MessageDecodeError as exc:
        log.error("skipping an undecodable result message (%s): %s", source, exc)
        return []


class PartialOrder:
    """The reading rule of docs/protocol.md ("Ordering and de-duplication") for one
    reader of one task: partials by ``(attempt, seq)``, each at most once and never one
    older than the newest taken; a status or final not of an older attempt than that.

    The one rule every reader applies: ``Task.events``/``wait`` and a backend that merges
    a replay with a live feed. A status or final may be taken again (readers fold them
    idempotently into the task's state)."""

    __slots__ = ("attempt", "seq")

    def __init__(self) -> None:
        self.attempt, self.seq = 0, -1

    def take(self, event: ResultEvent) -> bool:
        """Whether ``event`` is new to this reader (and, for a partial, note it)."""
        if event.kind != "partial":
            return event.attempt >= self.attempt
        if (event.attempt, event.seq) <= (self.attempt, self.seq):
            return False
        self.attempt, self.seq = event.attempt, event.seq
        return True
