"""What a workflow adds to a task message, and the ids of its tasks.

One header, ``qtasks-flow``, holds a JSON object (``Flow``): the workflow's id, where this
task stands in the plan, and the plan after it. The plan is a list of steps, each a plain
JSON object: a task (``{"task", "args", "kwargs", "options"}``), a group
(``{"group": [task, ...]}``) or a fan-out (``{"each": task}``, after a generator task).
``docs/workflows.md`` documents the same format for clients in other languages; this
module is its one implementation, used by the producer, the worker and the handle.

Ids are UUIDv7 strings whose time is a deterministic moment before the task was published
and whose random bits come from SHA-256 of the workflow id and the task's path: anyone
holding the workflow id and the finals of earlier steps computes the same id, so a step
started twice is the same task twice.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from qtasks.errors import MessageDecodeError

#: The header that carries a workflow (its value is a JSON object, see ``Flow``).
FLOW_HEADER = "qtasks-flow"
FLOW_VERSION = 1

#: One step of a plan as it travels: a task, ``{"group": [...]}`` or ``{"each": task}``.
Step = dict[str, Any]


def derive_id(workflow: str, path: str, ms: int) -> str:
    """The id of the task at ``path`` in ``workflow``: a UUIDv7 with ``ms`` (Unix time in
    milliseconds) as its time and the first 74 bits of SHA-256(``workflow/path``) as its
    random bits. Deterministic, and still time-ordered for the stores that start reading a
    task's results at its id's time."""
    digest = int.from_bytes(hashlib.sha256(f"{workflow}/{path}".encode()).digest()[:10], "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76
    value |= ((digest >> 68) & 0xFFF) << 64  # the first 12 bits
    value |= 0b10 << 62
    value |= (digest >> 6) & 0x3FFF_FFFF_FFFF_FFFF  # the next 62
    return str(uuid.UUID(int=value))


def id_ms(task_id: str) -> int:
    """The time (ms) of a UUIDv7 id; 0 for another id (a workflow id must be a UUIDv7)."""
    try:
        parsed = uuid.UUID(task_id)
    except ValueError:
        return 0
    return parsed.int >> 80 if parsed.version == 7 else 0


def ms_of(created_at: float | None, fallback: int) -> int:
    """A final's ``created_at`` in whole milliseconds (floor of the IEEE-754 double
    product, as any language computes it), the time of the ids that follow it."""
    return int(created_at * 1000) if created_at else fallback


def new_claim() -> str:
    """A token for one published copy of a continuation (see ``qtasks.canvas.claims``)."""
    return os.urandom(8).hex()


@dataclass(slots=True)
class Flow:
    """The ``qtasks-flow`` header: one task's place in its workflow.

    ``step`` indexes the plan the producer made; ``rest`` is the plan after this task's
    unit (a task, a group, or a generator with its ``each`` step); ``ms`` is the time in
    the ids of this step's tasks (for siblings and items to find each other). A group
    member has ``member`` (index, size); a fan-out item has ``item`` (the generator's
    attempt, the yield's seq) and ``gen`` (the generator's id); a generator followed by
    ``.each()`` has ``each`` (the item task). ``claim`` is set on what a worker publishes.
    """

    workflow: str
    step: int
    ms: int
    rest: list[Step] = field(default_factory=list)
    member: tuple[int, int] | None = None
    item: tuple[int, int] | None = None
    gen: str | None = None
    each: Step | None = None
    claim: str | None = None

    @property
    def next_step(self) -> int:
        """The plan index of ``rest[0]``: after this step, or after its ``each`` step."""
        return self.step + (2 if self.each is not None else 1)

    def to_header(self) -> str:
        data: dict[str, Any] = {"v": FLOW_VERSION, "wf": self.workflow, "step": self.step,
                                "t": self.ms, "rest": self.rest}
        if self.member is not None:
            data["member"] = list(self.member)
        if self.item is not None:
            data["item"] = list(self.item)
            data["gen"] = self.gen
        if self.each is not None:
            data["each"] = self.each
        if self.claim is not None:
            data["claim"] = self.claim
        return orjson.dumps(data).decode()

    @classmethod
    def from_header(cls, value: str) -> Flow:
        """Parse the header, with an error that names what is wrong."""
        try:
            data = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise MessageDecodeError(f"{FLOW_HEADER} header is not JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("v") != FLOW_VERSION:
            raise MessageDecodeError(f"{FLOW_HEADER} header is not a version "
                                     f"{FLOW_VERSION} object: {value:.80}")
        try:
            flow = cls(workflow=_typed(data, "wf", str), step=_typed(data, "step", int),
                       ms=_typed(data, "t", int), rest=_typed(data, "rest", list),
                       member=_pair(data, "member"), item=_pair(data, "item"),
                       gen=data.get("gen"), each=data.get("each"), claim=data.get("claim"))
        except (TypeError, ValueError) as exc:
            raise MessageDecodeError(f"{FLOW_HEADER} header: {exc}") from None
        if flow.item is not None and not isinstance(flow.gen, str):
            raise MessageDecodeError(f"{FLOW_HEADER} header: an item needs 'gen'")
        try:
            for index, step in enumerate(flow.rest):
                check_step(step)
                if is_each(step) and (index == 0 or not _is_task(flow.rest[index - 1])):
                    raise ValueError("an 'each' step must follow a task step")
            if flow.each is not None:
                check_step(flow.each, task_only=True)
        except ValueError as exc:
            raise MessageDecodeError(f"{FLOW_HEADER} header: {exc}") from None
        return flow


def _typed(data: Mapping[str, Any], key: str, kind: type) -> Any:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{key!r} must be {kind.__name__}, not {value!r:.40}")
    return value


def _pair(data: Mapping[str, Any], key: str) -> tuple[int, int] | None:
    value = data.get(key)
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{key!r} must be two integers, not {value!r:.40}")
    return value[0], value[1]


def flow_of(headers: Mapping[str, str]) -> Flow | None:
    """The workflow a message belongs to, or None for a task of no workflow. A header
    that cannot be read is logged by the caller as the message's fault."""
    value = headers.get(FLOW_HEADER)
    return None if value is None else Flow.from_header(value)


def renewed(headers: dict[str, str]) -> dict[str, str]:
    """Headers for the next attempt of a task published by a worker: the same flow with a
    new claim token, since that attempt's message is a new copy (a worker killed between
    publishing it and acking the failed one publishes it again, with another token)."""
    value = headers.get(FLOW_HEADER)
    if value is None:
        return headers
    flow = Flow.from_header(value)
    if flow.claim is None:
        return headers
    return {**headers, FLOW_HEADER: replace(flow, claim=new_claim()).to_header()}


# -- steps -------------------------------------------------------------------------------

#: The options a step may carry, with the JSON types they must have.
_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "queue": (str,), "priority": (int,), "max_time": (int, float), "delay": (int, float),
    "headers": (dict,)}


def check_step(step: Any, task_only: bool = False) -> None:
    """Raise ``ValueError`` naming what is wrong with one step of a plan: a worker runs
    what a header says, so what it says is checked before anything runs."""
    if not isinstance(step, dict):
        raise ValueError(f"a step must be an object, not {step!r:.60}")
    if not task_only and "group" in step:
        members = step["group"]
        if not isinstance(members, list) or not members:
            raise ValueError("a group step needs a list of one or more tasks")
        for member in members:
            check_step(member, task_only=True)
        return
    if not task_only and "each" in step:
        check_step(step["each"], task_only=True)
        return
    if not isinstance(step.get("task"), str) or not step["task"]:
        raise ValueError(f"a task step needs a 'task' name: {step!r:.60}")
    if not isinstance(step.get("args", []), list) \
            or not isinstance(step.get("kwargs", {}), dict):
        raise ValueError(f"step {step['task']!r}: 'args' must be a list, 'kwargs' an object")
    options = step.get("options", {})
    if not isinstance(options, dict):
        raise ValueError(f"step {step['task']!r}: 'options' must be an object")
    for name, value in options.items():
        kinds = _OPTION_TYPES.get(name)
        if kinds is not None and value is not None and (
                isinstance(value, bool) or not isinstance(value, kinds)):
            raise ValueError(f"step {step['task']!r}: option {name!r} has the wrong type")
    if not all(isinstance(v, str) for v in (options.get("headers") or {}).values()):
        raise ValueError(f"step {step['task']!r}: headers must be strings")


def _is_task(step: Step) -> bool:
    return not is_group(step) and not is_each(step)


def is_group(step: Step) -> bool:
    return "group" in step


def is_each(step: Step) -> bool:
    return "each" in step


def step_path(index: int, *more: int) -> str:
    """A task's path in its workflow: ``"2"`` (a task step), ``"2.0"`` (member 0 of the
    group at step 2), ``"3.1.7"`` (the item of the fan-out at step 3 made of seq 7 of its
    generator's attempt 1)."""
    return ".".join(str(part) for part in (index, *more))
