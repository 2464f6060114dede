"""Where tasks' results are in the result stream, as this process has read it.

The stream has no lookup by key: reading a task's events means reading the stream from
about the task's creation (its UUIDv7 time, minus ``stream_margin``), every task's
messages included, and ``get`` read on to the end of the stream (60 reads took 49 to 77 s
on a 3-node cluster). Every read now notes the stream offset (the ``x-stream-offset``
header of each delivery) of what it passes, from the message properties alone (grouped
finals excepted, whose body names their tasks):

- each task's success (the end of a task: a copy run twice succeeds alike), latest
  status (an error may be followed by another run: a dead letter requeued) and, when the
  read began before the task was created, first event;
- the ranges of offsets read end to end (``covered``), whose statuses and successes it
  therefore holds.

So ``get`` of a task whose success was seen reads one message at its offset (or none:
the latest successes read in full are kept); else it reads from the task's creation to
its success, passing over every range already read (``jump``). A late ``stream`` of a
task whose first event is known starts there. Bounded: past ``MAX_TASKS`` tasks the
index starts over (reads are then as before, never wrong).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict

from qtasks.protocol import ResultEvent, uuid7_time

#: Tasks whose offsets the index holds (about 150 bytes each), and final events it keeps
#: decoded (about 800 bytes each; the others are read again at their offset).
MAX_TASKS = 200_000
MAX_EVENTS = 10_000
#: Ranges read end to end it remembers; past it, the smallest gaps are closed by
#: forgetting the ranges around them (a read then reads them again).
MAX_RANGES = 4096


class StreamIndex:
    """Offsets of tasks' events in the result stream, learnt from this process's reads."""

    def __init__(self, margin: float) -> None:
        self.margin = margin
        self.finals: dict[str, int] = {}
        self.statuses: dict[str, int] = {}
        self.firsts: dict[str, int] = {}
        self.events: OrderedDict[str, ResultEvent] = OrderedDict()
        #: Disjoint, sorted ``[lo, hi)`` offset ranges read end to end (``los``: their
        #: starts, for ``bisect``).
        self.ranges: list[tuple[int, int]] = []
        self.los: list[int] = []

    def reset(self) -> None:
        self.finals.clear()
        self.statuses.clear()
        self.firsts.clear()
        self.events.clear()
        self.ranges.clear()
        self.los.clear()

    def keep(self, event: ResultEvent) -> None:
        """A success read in full: kept decoded (the most recent ``MAX_EVENTS``)."""
        if event.kind == "final" and event.status == "success" and event.id not in self.events:
            self.events[event.id] = event
            if len(self.events) > MAX_EVENTS:
                self.events.popitem(last=False)

    def note(self, task_id: str, kind: str, offset: int, since: float | None,
             status: str | None = None) -> None:
        """An event of ``task_id`` (``kind``: status, partial, batch or final, with its
        ``status``) at ``offset``, seen by a read that started at time ``since`` (None:
        not known). A success ends a task for good (a copy run twice succeeds alike); an
        error or a cancellation may be followed by another run (a dead letter requeued),
        so it counts as the latest status, not as the end."""
        if task_id not in self.firsts:
            if len(self.firsts) >= MAX_TASKS:
                self.reset()
            created = uuid7_time(task_id)
            # The first event seen is the task's first only if the read began before it.
            if since is not None and created is not None and created - self.margin >= since:
                self.firsts[task_id] = offset
            else:
                self.firsts[task_id] = -1
        if kind == "final" and status == "success":
            # The latest: a copy that ran twice succeeds twice, with its running between.
            if offset > self.finals.get(task_id, -1):
                self.finals[task_id] = offset
        elif kind in ("status", "final") and offset > self.statuses.get(task_id, -1):
            self.statuses[task_id] = offset

    def first(self, task_id: str) -> int | None:
        """The offset of the task's first event, if known to be its first."""
        offset = self.firsts.get(task_id, -1)
        return offset if offset >= 0 else None

    def forget(self, task_id: str) -> None:
        """The offsets of a task no longer hold it (the stream dropped them: expired)."""
        self.events.pop(task_id, None)
        self.finals.pop(task_id, None)
        self.statuses.pop(task_id, None)
        self.firsts.pop(task_id, None)

    def range_at(self, offset: int) -> tuple[int, int] | None:
        """The range read end to end that holds ``offset``, if any."""
        at = bisect.bisect_right(self.los, offset) - 1
        if at >= 0 and self.ranges[at][1] > offset:
            return self.ranges[at]
        return None

    def covered(self, first: int, last: int) -> None:
        """A read saw every offset from ``first`` to ``last`` (passing over ranges read
        before counts as seeing them)."""
        if first < 0 or last < first:
            return
        lo, hi = first, last + 1
        start = bisect.bisect_left(self.los, lo)
        if start > 0 and self.ranges[start - 1][1] >= lo:
            start -= 1
        end = start
        while end < len(self.ranges) and self.ranges[end][0] <= hi:
            lo, hi = min(lo, self.ranges[end][0]), max(hi, self.ranges[end][1])
            end += 1
        self.ranges[start:end] = [(lo, hi)]
        self.los[start:end] = [lo]
        if len(self.ranges) > MAX_RANGES:
            # Forget the range after the smallest gap (its tasks stay noted).
            gaps = [(self.ranges[i + 1][0] - self.ranges[i][1], i)
                    for i in range(len(self.ranges) - 1)]
            _, at = min(gaps)
            del self.ranges[at + 1], self.los[at + 1]
