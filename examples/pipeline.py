"""A file pipeline: a generator reads a file chunk by chunk, every chunk is processed in
parallel the moment it is read, and a chord sums the results up.

    python -m examples.pipeline [FILE]      # memory://: one process, nothing to install

``read_chunks.s(path) | count_words.each() | total.s()`` is one workflow: each value the
generator yields starts a ``count_words`` task at once (while the generator goes on
reading), and ``total`` starts once every chunk was counted, with the counts in reading
order. With ``QTASKS_BROKER_URL=amqp://...`` (or ``nats://...``) and ``qtasks worker
examples.pipeline:app`` running elsewhere, the same code runs across processes, and
survives a worker killed at any point (docs/workflows.md).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from qtasks import QueueTasks

app = QueueTasks()

#: Lines per chunk: a chunk ends at a line's end, so no word is cut in two.
LINES_PER_CHUNK = 40


@app.task
async def read_chunks(path: str):  # type: ignore[no-untyped-def]
    """Yield the file ``LINES_PER_CHUNK`` lines at a time, as it is read."""
    lines: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as file:  # noqa: ASYNC230 - a demo
        for line in file:
            lines.append(line)
            if len(lines) == LINES_PER_CHUNK:
                yield "".join(lines)
                lines = []
                await asyncio.sleep(0.02)  # a slow disk, or a network read
    if lines:
        yield "".join(lines)


@app.task
async def count_words(chunk: str) -> int:
    """The per-chunk work (here: count words; think parse, enrich, upload)."""
    await asyncio.sleep(0.1)
    return len(chunk.split())


@app.task
async def total(counts: list[int]) -> int:
    return sum(counts)


async def main(path: str) -> None:
    async with app:
        pipeline = read_chunks.s(path) | count_words.each() | total.s()
        handle = await pipeline.add_task()
        chunks = 0
        async for step, _chunk in handle.stream():
            if step == 0:  # the generator's yields; (1, seq) would be the items' own
                chunks += 1
                print(f"read chunk {chunks}: its count_words task is queued", flush=True)
        words = await handle.result(timeout=60)
        reader = next(t for t in handle.tasks.values() if t.name == "read_chunks")
        items = [t for t in handle.tasks.values() if t.name == "count_words"]
        early = sum(1 for t in items if t.started_at and reader.finished_at
                    and t.started_at < reader.finished_at)
        print(f"{path}: {words} words in {chunks} chunks; {early} of {len(items)} chunks were "
              f"being counted while the file was still being read")


if __name__ == "__main__":
    default = Path(__file__).resolve().parent.parent / "README.md"
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else str(default)))
