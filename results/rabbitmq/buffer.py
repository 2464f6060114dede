"""The events of one task as they arrive on this process's inbox, for its watchers."""

from __future__ import annotations

import asyncio
import time

from qtasks.protocol import ResultEvent

#: A buffer nobody watches keeps at most this many events; past it, it forgets them and a
#: later ``watch`` replays the stream instead. Bounded memory whatever the producer does.
MAX_UNWATCHED_EVENTS = 10_000
#: Events already read by every watcher are dropped once a buffer holds this many.
TRIM_AT = 1024


class TaskBuffer:
    """Events of one task, as they arrive on this process's inbox, for its watchers.

    ``complete``: it holds every event of the task from the first (its submitter called
    ``expect`` before publishing, and nothing was trimmed), so watching it needs no
    replay. ``gap``: the connection dropped and the events published meanwhile are still
    being recovered from the stream; watchers wait. While recovering, live events are
    ``held`` so that they come after the recovered ones. Each watcher keeps a cursor;
    events behind every cursor are trimmed.
    """

    __slots__ = ("bound", "changed", "complete", "cursors", "events", "final", "first", "gap",
                 "held", "touched")

    def __init__(self, complete: bool, gap: bool) -> None:
        self.events: list[ResultEvent] = []
        self.first = 0  # position of events[0] among every event this buffer received
        self.complete = complete
        self.gap = gap
        self.held: list[ResultEvent] | None = [] if gap else None
        self.changed = asyncio.Event()
        self.cursors: dict[int, int] = {}
        self.bound = False
        self.touched = time.monotonic()
        self.final: ResultEvent | None = None

    def receive(self, event: ResultEvent) -> None:
        if self.held is not None:
            self.held.append(event)
        else:
            self.add(event)

    def add(self, event: ResultEvent) -> None:
        self.events.append(event)
        self.touched = time.monotonic()
        if event.kind == "final":
            self.final = event
        if not self.cursors and len(self.events) > MAX_UNWATCHED_EVENTS:
            self.forget(len(self.events))
        self.wake()

    def recovered(self) -> None:
        """The gap is filled: what arrived live meanwhile follows the recovered events."""
        for event in self.held or ():
            self.add(event)
        self.held = None
        self.gap = False
        self.wake()

    def wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def forget(self, count: int) -> None:
        del self.events[:count]
        self.first += count
        self.complete = False

    def trim(self) -> None:
        if len(self.events) >= TRIM_AT and self.cursors:
            self.forget(min(self.cursors.values()) - self.first)
