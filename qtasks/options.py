"""The options of one enqueue, apart from the task's own arguments, checked up front.

``add_task(*args, timeout=..., **kwargs)`` reads well but shares one namespace between the
task's arguments and the options; ``send_task(name, args, kwargs, **options)`` and
``TaskFunction.apply_async(args, kwargs, **options)`` (Celery's shape) keep them apart, so
a task may take a parameter called ``timeout`` or ``task_id``. Every option is checked
here, before anything is published, with an error that names it: a ``priority="high"``
must not travel to a broker that fails on it later, deep inside.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qtasks.errors import OptionError

#: The names ``add_task`` takes as options rather than as the task's keyword arguments.
OPTION_NAMES = frozenset({"timeout", "priority", "delay", "task_id", "queue", "max_time",
                          "headers"})


@dataclass(slots=True, frozen=True)
class SendOptions:
    """How one run is enqueued and whether its submitter waits; None: the default."""

    timeout: float | None = None
    priority: int | None = None
    delay: float | None = None
    task_id: str | None = None
    queue: str | None = None
    max_time: float | None = None
    headers: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        for name in ("timeout", "delay"):
            _number(name, getattr(self, name), minimum=0.0, inclusive=True)
        _number("max_time", self.max_time, minimum=0.0, inclusive=False)
        if self.priority is not None and (isinstance(self.priority, bool)
                                          or not isinstance(self.priority, int)):
            raise OptionError(f"priority must be an integer, not {_shown(self.priority)}")
        for name in ("task_id", "queue"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise OptionError(f"{name} must be a non-empty string, not {_shown(value)}")
        if self.headers is not None and (
                not isinstance(self.headers, Mapping)
                or not all(isinstance(k, str) and isinstance(v, str)
                           for k, v in self.headers.items())):
            raise OptionError(f"headers must map strings to strings, not {_shown(self.headers)}")


def check_arguments(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """``send_task``'s ``args`` and ``kwargs`` as a JSON message can carry them."""
    if isinstance(args, str | bytes) or not isinstance(args, Sequence):
        raise OptionError(f"args must be a list or tuple, not {_shown(args)}")
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise OptionError(f"kwargs must map argument names to values, not {_shown(kwargs)}")


def colliding_parameters(func: Callable[..., Any]) -> frozenset[str]:
    """The option names that are also parameters of ``func``: for such a task,
    ``add_task(..., timeout=3)`` is ambiguous and refused (``apply_async`` is not)."""
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):  # a builtin or callable without a signature
        return frozenset()
    return OPTION_NAMES & {name for name, p in parameters.items()
                           if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _number(name: str, value: Any, *, minimum: float, inclusive: bool) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise OptionError(f"{name} must be a number of seconds, not {_shown(value)}")
    if value < minimum or (value == minimum and not inclusive):
        bound = f"{'at least' if inclusive else 'more than'} {minimum:g}"
        raise OptionError(f"{name} must be {bound} seconds, not {value!r}")


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r:.60}"
