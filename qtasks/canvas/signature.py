"""Signatures, and the workflows composed of them: ``chain``, ``group``, ``chord`` and the
stream fan-out ``.each()``.

A ``Signature`` is one call of a task, by name, with its arguments and send options:
plain data that ``to_dict``/``from_dict`` carry across processes (a periodic schedule, a
step of a workflow on the wire). The composites only arrange signatures; ``add_task``
turns one into a plan and hands it to ``qtasks.canvas.launch``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from qtasks.canvas.handle import WorkflowHandle
from qtasks.canvas.launch import WorkflowApp, start_workflow
from qtasks.canvas.wire import Step
from qtasks.errors import ConfigurationError, OptionError
from qtasks.options import SendOptions, check_arguments

if TYPE_CHECKING:
    from qtasks.runtime import Runtime
    from qtasks.task import Task

#: The send options a signature may carry (``add_task``'s, without ``timeout``: a
#: signature is sent later, by whoever holds it, and waits for nothing).
SIGNATURE_OPTIONS = frozenset({"priority", "delay", "task_id", "queue", "max_time",
                               "headers"})


class Canvas:
    """What can be composed with ``|`` and started with ``add_task()``."""

    def steps(self) -> list[Signature | Group | Each]:
        raise NotImplementedError

    def __or__(self, other: Canvas) -> Chain:
        if not isinstance(other, Canvas):
            return NotImplemented
        return Chain(*self.steps(), *other.steps())

    def app(self) -> WorkflowApp | None:
        """The app of the first signature that has one (``task.s()`` does)."""
        for step in self.steps():
            for signature in step.signatures():
                if signature.bound is not None:
                    return signature.bound
        return None

    def plan(self, runtime: Runtime) -> list[Step]:
        """The steps as they travel (``qtasks.canvas.wire``), each task's queue, priority
        and ``max_time`` settled here, where the producer knows them."""
        steps = self.steps()
        check_plan(steps)
        return [step.wire(runtime) for step in steps]

    async def add_task(self, app: WorkflowApp | None = None) -> WorkflowHandle:
        """Start the workflow: publish its first step, return a handle on it."""
        app = app or self.app()
        if app is None:
            raise ConfigurationError(
                "this workflow names no app: build its signatures with task.s() or "
                "app.signature(), or pass add_task(app=...)")
        return await start_workflow(app, self.plan(app.runtime))


@dataclass(eq=True)
class Signature(Canvas):
    """One call of the task ``name``: ``args``, ``kwargs`` and send ``options``."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    #: The app it was made from (``task.s()``, ``app.signature()``); not serialised.
    bound: WorkflowApp | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise OptionError(f"a signature needs a task name, not {self.name!r:.60}")
        if isinstance(self.args, list):
            self.args = tuple(self.args)
        check_arguments(self.args, self.kwargs)
        self.args, self.kwargs = tuple(self.args), dict(self.kwargs)
        unknown = set(self.options) - SIGNATURE_OPTIONS
        if unknown:
            raise OptionError(f"signature of {self.name!r}: unknown option "
                              f"{', '.join(sorted(unknown))}; a signature takes "
                              f"{', '.join(sorted(SIGNATURE_OPTIONS))}")
        SendOptions(**self.options)  # each option checked, with an error that names it
        self.options = {k: v for k, v in self.options.items() if v is not None}

    def steps(self) -> list[Signature | Group | Each]:
        return [self]

    def signatures(self) -> list[Signature]:
        return [self]

    def wire(self, runtime: Runtime) -> Step:
        """This call as a step of a plan: the task's registered queue, priority and
        ``max_time`` (or the app's default queue) unless the signature sets them."""
        if "task_id" in self.options:
            raise OptionError(f"signature of {self.name!r}: a workflow's tasks get their "
                              "ids from the workflow; task_id is for a call sent alone")
        schema = runtime.registry.get(self.name)
        options = dict(self.options)
        options.setdefault("queue", schema.queue if schema else runtime.default_queue)
        priority = options.setdefault("priority", schema.priority if schema else 0)
        runtime.check_priority(priority)
        if schema is not None and schema.max_time is not None:
            options.setdefault("max_time", schema.max_time)
        return {**self.to_dict(), "options": options}

    def each(self) -> Each:
        """This call as the fan-out step after a generator: one run per yielded value,
        that value first among its arguments."""
        return Each(self)

    def set(self, **options: Any) -> Signature:
        """A copy with these send options added (or replaced)."""
        return Signature(self.name, self.args, self.kwargs, {**self.options, **options},
                         bound=self.bound)

    async def add_task(self, app: WorkflowApp | None = None,  # type: ignore[override]
                       **options: Any) -> Task:
        """Send this call alone (a ``Task``, as ``send_task`` gives), ``options`` over
        the signature's own. In a workflow, use ``chain(...)`` and friends instead."""
        app = app or self.bound
        if app is None:
            raise ConfigurationError(f"signature of {self.name!r} names no app: pass "
                                     "add_task(app=...)")
        return await app.send_task(self.name, self.args, self.kwargs,
                                   **{**self.options, **options})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this call (the form a workflow's steps travel in)."""
        return {"task": self.name, "args": list(self.args), "kwargs": dict(self.kwargs),
                "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], app: WorkflowApp | None = None) -> Signature:
        """The inverse of ``to_dict``; a malformed object is an ``OptionError``."""
        if not isinstance(data, Mapping) or not isinstance(data.get("task"), str):
            raise OptionError(f"not a signature (an object with a 'task' name): {data!r:.80}")
        args, kwargs = data.get("args", []), data.get("kwargs", {})
        options = data.get("options", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict) \
                or not isinstance(options, dict):
            raise OptionError(f"signature of {data['task']!r}: 'args' must be a list, "
                              "'kwargs' and 'options' objects")
        return cls(data["task"], tuple(args), kwargs, options, bound=app)

    def __repr__(self) -> str:
        call = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        extra = f" {self.options}" if self.options else ""
        return f"{self.name}.s({', '.join(call)}){extra}"


@dataclass(eq=True)
class Each(Canvas):
    """The fan-out step: ``signature`` runs once for every value the step before it (a
    generator task) yields, while that generator still runs."""

    signature: Signature

    def steps(self) -> list[Signature | Group | Each]:
        return [self]

    def signatures(self) -> list[Signature]:
        return [self.signature]

    def wire(self, runtime: Runtime) -> Step:
        return {"each": self.signature.wire(runtime)}

    def __repr__(self) -> str:
        return f"{self.signature!r}.each()"


class Group(Canvas):
    """Signatures that run in parallel; their results, in member order, are the group's."""

    def __init__(self, members: Iterable[Signature]) -> None:
        self.members = list(members)
        for member in self.members:
            if not isinstance(member, Signature):
                raise OptionError(
                    f"a group's members are signatures (task.s(...)), not {member!r:.60}; "
                    "to run a chain in parallel, make it a task that starts the chain")
        if not self.members:
            raise OptionError("a group needs at least one member")

    def steps(self) -> list[Signature | Group | Each]:
        return [self]

    def signatures(self) -> list[Signature]:
        return list(self.members)

    def wire(self, runtime: Runtime) -> Step:
        return {"group": [member.wire(runtime) for member in self.members]}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Group) and other.members == self.members

    def __repr__(self) -> str:
        return f"group({self.members!r})"


class Chain(Canvas):
    """Steps run one after another; each gets the previous step's result first among its
    arguments (a group's or a fan-out's: the list of its results)."""

    def __init__(self, *items: Canvas) -> None:
        steps: list[Signature | Group | Each] = []
        for item in items:
            if not isinstance(item, Canvas):
                raise OptionError(f"a chain's steps are signatures, groups, chords or "
                                  f".each() steps, not {item!r:.60}")
            steps += item.steps()
        check_plan(steps)
        self._steps = steps

    def steps(self) -> list[Signature | Group | Each]:
        return list(self._steps)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Chain) and other._steps == self._steps

    def __repr__(self) -> str:
        return " | ".join(repr(step) for step in self._steps)


def check_plan(steps: Sequence[Signature | Group | Each]) -> None:
    """A fan-out needs a single task before it to yield its values."""
    if not steps:
        raise OptionError("a workflow needs at least one step")
    for index, step in enumerate(steps):
        if isinstance(step, Each) and (index == 0 or not isinstance(steps[index - 1],
                                                                      Signature)):
            raise OptionError(f"{step!r} must follow a single (generator) task, whose "
                              "yields it runs on")


def chain(*steps: Canvas) -> Chain:
    """``chain(a.s(1), b.s(), c.s())``: the same as ``a.s(1) | b.s() | c.s()``."""
    return Chain(*steps)


def group(*members: Signature | Iterable[Signature]) -> Group:
    """``group(process.s(f) for f in files)`` or ``group(a.s(), b.s())``."""
    if len(members) == 1 and not isinstance(members[0], Canvas):
        return Group(members[0])
    return Group(members)  # type: ignore[arg-type]


def chord(header: Group | Iterable[Signature], body: Canvas) -> Chain:
    """``chord(group, summarize.s())``: ``body`` starts once every member succeeded,
    with their results in member order (a group followed by a step)."""
    members = header if isinstance(header, Group) else Group(header)
    return Chain(members, body)


class TaskSignatures:
    """Signatures of a registered task: what ``TaskFunction`` offers besides running."""

    @property
    def name(self) -> str:
        raise NotImplementedError

    @property
    def _app(self) -> WorkflowApp:
        return cast(WorkflowApp, self.app)  # type: ignore[attr-defined]

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """This task called with these arguments, not sent yet."""
        return Signature(self.name, args, kwargs, bound=self._app)

    def signature(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                  **options: Any) -> Signature:
        """This task called with ``args``/``kwargs`` and send ``options`` (``queue``,
        ``priority``, ``delay``, ``max_time``, ``headers``, ``task_id``)."""
        return Signature(self.name, tuple(args), dict(kwargs or {}), options, bound=self._app)

    def each(self, *args: Any, **kwargs: Any) -> Each:
        """The fan-out step ``generator.s(...) | task.each()``: this task runs once per
        yielded value, with the value first and these arguments after it."""
        return Each(self.s(*args, **kwargs))


class AppSignatures:
    """``app.signature(name, ...)``: a call of a task this process need not import."""

    def signature(self, task_name: str, args: Sequence[Any] = (),
                  kwargs: Mapping[str, Any] | None = None, **options: Any) -> Signature:
        return Signature(task_name, tuple(args), dict(kwargs or {}), options,
                         bound=self)  # type: ignore[arg-type]

    def workflow_handle(self, data: Mapping[str, Any]) -> WorkflowHandle:
        """A handle on a workflow another process started, from its ``to_dict()``."""
        return WorkflowHandle.from_dict(cast(WorkflowApp, self).runtime, dict(data))
