"""Reads of the result stream asked for at the same time, served by one pass.

A read of the stream (``get``, ``get_many``, ``history``) costs a channel, a stream
consumer and a confirmed probe, and RabbitMQ attaches stream consumers about one at a
time: fifty reads asked at once took 0.7 s one by one, and the workers of a workflow's
fan-out ask for many at once (their claims and joins). Reads asked while a pass runs wait
for the next pass, which serves all of them: it starts at the earliest of their times and
reads up to a probe appended after every one of them was asked, so each sees everything
published before it asked, as a read of its own would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from qtasks.protocol import ResultEvent
from qtasks.results.rabbitmq.replay import ReplayReader

#: Reads waiting for one pass: the tasks each wants, where its events go, and its mode.
Batch = list[tuple[frozenset[str], asyncio.Future[list[ResultEvent]], str]]


class SharedReads:
    """Finite reads of the events of some tasks, batched into passes of the stream."""

    def __init__(self, replay: ReplayReader, margin: float) -> None:
        self.replay = replay
        self.margin = margin
        self._waiting: Batch = []
        self._serving: Batch = []
        self._pass: asyncio.Task[None] | None = None

    async def read(self, task_ids: Collection[str], mode: str = "all") -> list[ResultEvent]:
        """Every stored event of ``task_ids``, in the stream's order (``mode`` ``all``);
        up to their finals (``final``); or only what ``get`` needs (``latest``: the read
        may pass over what the stream index already knows, see replay.start_for)."""
        future: asyncio.Future[list[ResultEvent]] = asyncio.get_running_loop().create_future()
        self._waiting.append((frozenset(task_ids), future, mode))
        if self._pass is None or self._pass.done():
            self._pass = asyncio.create_task(self._serve(), name="qtasks-result-reads")
        return await future

    async def _serve(self) -> None:
        try:
            while self._waiting:
                self._serving, self._waiting = self._waiting, []
                await self._one_pass(self._serving)
        finally:  # cancelled (the store closes): no caller is left waiting for ever
            for _, future, _ in self._serving:
                if not future.done():
                    future.cancel()

    async def _one_pass(self, batch: Batch) -> None:
        wanted = frozenset().union(*(ids for ids, _, _ in batch))
        modes = {mode for _, _, mode in batch}
        mode = next(iter(modes)) if len(modes) == 1 else "all" if "all" in modes else "final"
        try:
            events = [event async for event in self.replay.retrying(
                set(wanted), self.replay.start_for(set(wanted), mode),
                f"reading results of {len(wanted)} tasks",
                until_finals=None if mode == "all" else set(wanted),
                # Only a success ends ``get``'s read early: an error may be followed by
                # another run (a dead letter requeued), whose outcome ``get`` reports.
                success_only=mode == "latest")]
        except Exception as exc:
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for ids, future, _ in batch:
            if not future.done():  # its caller may have given up
                future.set_result([event for event in events if event.id in ids])

    def close(self) -> None:
        """Cancel the pass under way and every read waiting."""
        if self._pass is not None:
            self._pass.cancel()
        for _, future, _ in self._waiting:
            future.cancel()
        self._waiting.clear()
