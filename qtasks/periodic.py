"""Periodic schedules (``app.periodic``): when a schedule fires, the id of each firing
(a *tick*), and which ticks a scheduler enqueues when it gets to them late.

Pure computation on Unix times, so that any clock can drive it (the tests use their own).
The cron parser (``cronsim``, the ``beat`` extra) is imported only when a cron schedule is
declared or computed: ``import qtasks`` never loads it.

Ticks, and why so:

- ``every=N`` ticks at the Unix times that are multiples of ``N``: every scheduler
  computes the same ticks without talking to the others, and a restart keeps the phase.
- ``cron="..."`` ticks where the expression matches the wall clock of ``tz`` (default
  UTC), through daylight-saving changes as cronsim reads them.
- A tick's task id is a UUIDv7 made from the tick's time (its first 48 bits, so the id
  sorts and reads back as that time) and a hash of the schedule name and the time (the
  rest): the same tick gets the same id in every scheduler, which is what lets a broker
  drop a copy and a reader tell two runs of one tick apart.
- Ticks due while no scheduler was active: those at most ``grace`` seconds old (a
  scheduler taking over from one that died) are enqueued late, once each; older ones were
  *missed* and follow the schedule's ``missed`` policy: ``"skip"`` drops them,
  ``"run_once"`` enqueues the latest of them once.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from qtasks.errors import ConfigurationError
from qtasks.options import check_arguments
from qtasks.protocol import TaskMessage, encode

Missed = Literal["skip", "run_once"]
MISSED: tuple[Missed, ...] = ("skip", "run_once")
#: Header names a tick's task message carries (part of the documented wire format).
SCHEDULE_HEADER = "qtasks-schedule"
TICK_HEADER = "qtasks-tick"


def _cronsim() -> Any:
    try:
        import cronsim
    except ImportError:
        raise ConfigurationError(
            "cron= schedules need the cron parser: pip install 'qtasks[beat]'") from None
    return cronsim


@dataclass(slots=True)
class Schedule:
    """One periodic task: what to enqueue (``task``, ``args``, ``kwargs``, ``queue``,
    ``priority``, ``headers``) and when (``every`` seconds or ``cron`` in ``tz``)."""

    name: str
    task: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    every: float | None = None
    cron: str | None = None
    tz: tzinfo = UTC
    missed: Missed = "skip"
    queue: str | None = None
    priority: int | None = None
    max_time: float | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def next_after(self, t: float) -> float:
        """The first tick strictly after ``t``."""
        if self.every is not None:
            return (math.floor(t / self.every) + 1) * self.every
        start = datetime.fromtimestamp(t, self.tz)
        return float(next(_cronsim().CronSim(self.cron, start)).timestamp())

    def latest_until(self, t: float) -> float | None:
        """The last tick at or before ``t`` (None if the expression never matched)."""
        if self.every is not None:
            return math.floor(t / self.every) * self.every
        # cronsim counts back from a minute strictly before its start, so start just after.
        start = datetime.fromtimestamp(math.floor(t) + 1, self.tz)
        try:
            return float(next(_cronsim().CronSim(self.cron, start, reverse=True)).timestamp())
        except StopIteration:
            return None

    def shortest_gap(self, now: float) -> float:
        """About the shortest time between two ticks (the default lock TTL follows it)."""
        if self.every is not None:
            return self.every
        ticks = [self.next_after(now)]
        for _ in range(4):
            ticks.append(self.next_after(ticks[-1]))
        return min(b - a for a, b in itertools.pairwise(ticks))

    def due(self, cursor: float, now: float, grace: float) -> tuple[list[float], float]:
        """The ticks to enqueue now, oldest first, when every tick up to ``cursor`` was
        handled: those in ``(cursor, now]`` at most ``grace`` old, and, under
        ``missed="run_once"``, the latest older one; and the cursor after them (past
        the ticks skipped too)."""
        horizon = now - grace
        ticks: list[float] = []
        if cursor < horizon:
            missed = self.latest_until(horizon)
            if missed is not None and missed > cursor and self.missed == "run_once":
                ticks.append(missed)
            cursor = horizon
        tick = self.next_after(cursor)
        while tick <= now:
            ticks.append(tick)
            tick = self.next_after(tick)
        return ticks, max([cursor, *ticks])


def tick_id(schedule: str, tick: float) -> str:
    """The task id of ``schedule``'s tick at Unix time ``tick``: a UUIDv7 whose time is the
    tick's (to the millisecond) and whose other 74 bits are the SHA-256 of
    ``"<schedule>\\x00<milliseconds>"``, so every scheduler derives the same id."""
    ms = round(tick * 1000)
    digest = int.from_bytes(
        hashlib.sha256(f"{schedule}\x00{ms}".encode()).digest()[:10], "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76
    value |= ((digest >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= digest & 0x3FFF_FFFF_FFFF_FFFF
    return str(uuid.UUID(int=value))


def _zone(tz: str | tzinfo | None) -> tzinfo:
    if tz is None:
        return UTC
    if isinstance(tz, tzinfo):
        return tz
    if not isinstance(tz, str) or not tz:
        raise ConfigurationError(f"tz must be a time zone name like 'Europe/Paris', not {tz!r}")
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(
            f"unknown time zone {tz!r} (an IANA name like 'Europe/Paris' or 'UTC')") from None


def make_schedule(target: object, *, cron: str | None, every: float | None,
                  tz: str | tzinfo | None, args: Sequence[Any] | None,
                  kwargs: Mapping[str, Any] | None, name: str | None,
                  missed: str) -> Schedule:
    """Check everything ``app.periodic`` was given and build the ``Schedule``.

    ``target`` is a task name, or any object with a ``name`` (what ``@app.task`` returns),
    and with ``args``/``kwargs``/``options`` when it is a signature (``task.s(...)``): its
    arguments and options (``queue``, ``priority``, ``headers``) are then the schedule's.
    """
    task = target if isinstance(target, str) else getattr(target, "name", None)
    if not isinstance(task, str) or not task:
        raise ConfigurationError(
            f"periodic() takes a task name, a task or a signature (task.s(...)), "
            f"not {target!r}")
    carried_args = getattr(target, "args", None)
    carried_kwargs = getattr(target, "kwargs", None)
    if (carried_args or carried_kwargs) and (args or kwargs):
        raise ConfigurationError(
            f"the signature for {task!r} carries its arguments already; give args and "
            "kwargs either in the signature or to periodic(), not both")
    check_arguments(args or (), kwargs or {})  # before any conversion hides a mistake
    args = list(args or carried_args or ())
    kwargs = dict(kwargs or carried_kwargs or {})
    check_arguments(args, kwargs)
    encode(TaskMessage(id="", task=task, args=args, kwargs=kwargs))  # JSON, or refused now
    options = dict(getattr(target, "options", None) or {})
    fixed = sorted(set(options) & {"task_id", "delay"})
    if fixed:
        raise ConfigurationError(
            f"a periodic {task!r} cannot carry {' or '.join(fixed)}: a tick's task id "
            "comes from its schedule and time, and it is enqueued when it is due")
    if (cron is None) == (every is None):
        raise ConfigurationError(f"periodic {task!r}: give exactly one of cron= and every=")
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, (int, float)) \
                or not math.isfinite(every) or every <= 0:
            raise ConfigurationError(
                f"every must be a positive number of seconds, not {every!r}")
        if tz is not None:
            raise ConfigurationError(
                "tz= applies to cron= schedules; every= counts seconds, the same in every "
                "time zone")
    zone = _zone(tz)
    if cron is not None:
        if not isinstance(cron, str):
            raise ConfigurationError(f"cron must be a string like '*/5 * * * *', not {cron!r}")
        module = _cronsim()
        try:
            module.CronSim(cron, datetime.now(zone))
        except module.CronSimError as exc:
            raise ConfigurationError(f"invalid cron expression {cron!r}: {exc}") from None
    if missed not in MISSED:
        raise ConfigurationError(f"missed must be 'skip' or 'run_once', not {missed!r}")
    if name is not None and (not isinstance(name, str) or not name):
        raise ConfigurationError(f"a schedule name must be a non-empty string, not {name!r}")
    headers = options.get("headers") or {}
    return Schedule(
        name=name or f"{task}@{cron if cron is not None else f'every {every:g}s'}",
        task=task, args=args, kwargs=kwargs, every=float(every) if every else None,
        cron=cron, tz=zone, missed=missed,
        queue=options.get("queue"), priority=options.get("priority"),
        max_time=options.get("max_time"),
        headers={str(k): str(v) for k, v in headers.items()})
