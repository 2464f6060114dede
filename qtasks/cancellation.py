"""What a worker remembers of cancel requests (``QueueTasks.cancel``).

Requests are broadcast, not queued: each worker keeps the ids it heard of for a while, so
that a cancelled task that reaches it later (queued behind others, or delayed) ends
``cancelled`` without running. Bounded in time and in number, so a flood of requests
costs a fixed amount of memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict

#: Seconds a worker remembers a cancel request, and how many it keeps at most.
REVOKE_TTL = 24 * 3600.0
REVOKE_LIMIT = 100_000


class Revocations:
    """Task ids asked to be cancelled, each forgotten ``ttl`` seconds after the request
    (or once ``limit`` newer ones arrived)."""

    def __init__(self, ttl: float = REVOKE_TTL, limit: int = REVOKE_LIMIT) -> None:
        self.ttl = ttl
        self.limit = limit
        self._ids: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def add(self, task_id: str, reason: str = "") -> None:
        self._ids.pop(task_id, None)
        self._ids[task_id] = (time.monotonic() + self.ttl, reason)
        self._expire()

    def reason(self, task_id: str) -> str | None:
        """Why ``task_id`` was cancelled ("" if no reason was given), or None if it was
        not (or no longer remembered). Asked for every task: one lookup, no sweep."""
        entry = self._ids.get(task_id)
        return None if entry is None or entry[0] <= time.monotonic() else entry[1]

    def _expire(self) -> None:
        now = time.monotonic()
        while self._ids:
            task_id, (until, _) = next(iter(self._ids.items()))
            if until > now and len(self._ids) <= self.limit:
                break
            del self._ids[task_id]
